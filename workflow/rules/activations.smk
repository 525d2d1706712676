rule activations:
    input:
        checkpoint=f"{R}/checkpoints/step{{step}}",
        tokens=f"{R}/tokens",
    output:
        expand(
            f"{R}/activations/step{{step}}/layer{{layer}}/{{split}}.parquet",
            layer=LAYERS,
            split=SPLITS,
            allow_missing=True,
        ),
    log:
        f"{R}/logs/activations/step{{step}}.log",
    benchmark:
        f"{R}/benchmarks/activations/step{{step}}.tsv"
    threads: 1  # start-up (imports, loading) dominates at small scale: two such jobs share 2 cores better than one
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        settings=settings("activations"),
        out=parent(2),
    shell:
        "PYTHONPATH=src python -m saedynamics activations --settings {params.settings:q} --threads {threads}"
        " --checkpoint {input.checkpoint} --tokens {input.tokens} --out {params.out} > {log} 2>&1"
