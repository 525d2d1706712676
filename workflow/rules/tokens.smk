rule tokens:
    output:
        tokens=f"{R}/tokens.parquet",
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
    shell:
        "PYTHONPATH=src python -m saedynamics tokens --settings {params.settings:q}"
        " --out-tokens {output.tokens} --out-tokenizer {output.tokenizer} > {log} 2>&1"
