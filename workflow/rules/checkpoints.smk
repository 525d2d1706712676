# Two sources behind one contract: checkpoints/step<N>/ (HF model dir + manifest.json).
# hub: saedynamics.checkpoints downloads and verifies; micro: saedynamics.micro_lm trains.
if CFG.model.source == "hub":

    rule checkpoint:
        input:
            # earlier steps first, so that byte-identical weights are recorded as duplicates
            earlier=lambda wc: [f"{R}/checkpoints/step{s}" for s in STEPS if s < int(wc.step)],
        output:
            directory(f"{R}/checkpoints/step{{step}}"),
        log:
            f"{R}/logs/checkpoint/step{{step}}.log",
        benchmark:
            f"{R}/benchmarks/checkpoint/step{{step}}.tsv"
        localrule: True
        resources:
            mem_mb=8000,
        params:
            settings=settings("checkpoint"),
        shell:
            "PYTHONPATH=src python -m saedynamics checkpoint --settings {params.settings:q} --step {wildcards.step}"
            " --earlier {input.earlier} --out {output} > {log} 2>&1"

else:

    rule micro_lm:
        input:
            tokens=f"{R}/tokens",
            tokenizer=f"{R}/tokenizer",
        output:
            checkpoints=[directory(f"{R}/checkpoints/step{s}") for s in CFG.model.schedule()],
            curve=f"{R}/checkpoints/micro_lm.parquet",
        log:
            f"{R}/logs/micro_lm.log",
        benchmark:
            f"{R}/benchmarks/micro_lm.tsv"
        threads: 1  # runs beside the validation job, which starts first: two jobs, one core each
        resources:
            mem_mb=4000,
        params:
            settings=settings("micro_lm"),
            root=lambda wc, output: Path(output.curve).parent,
        shell:
            "PYTHONPATH=src python -m saedynamics micro-lm --settings {params.settings:q} --threads {threads}"
            " --tokens {input.tokens} --tokenizer {input.tokenizer}"
            " --out-root {params.root} --curve {output.curve} > {log} 2>&1"
