# The token sample, built in resume/tokens/ (not an output: a killed job's shards are kept for its
# restart) and renamed to tokens/ when complete.
rule tokens:
    output:
        tokens=directory(f"{R}/tokens"),
        tokenizer=directory(f"{R}/tokenizer"),
    log:
        f"{R}/logs/tokens.log",
    benchmark:
        f"{R}/benchmarks/tokens.tsv"
    localrule: True
    resources:
        mem_mb=4000,
    params:
        settings=settings("tokens"),
        work=f"{R}/resume/tokens",
    shell:
        "PYTHONPATH=src python -m saedynamics tokens --settings {params.settings:q}"
        " --out-tokens {output.tokens} --out-tokenizer {output.tokenizer}"
        " --work {params.work:q} > {log} 2>&1"
