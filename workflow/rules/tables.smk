rule tables:
    input:
        metrics=expand(
            f"{R}/metrics/step{{step}}/layer{{layer}}/{{architecture}}/{{metric}}.json",
            step=STEPS,
            layer=LAYERS,
            architecture=ARCHITECTURES,
            metric=METRICS,
        ),
        curves=expand(
            f"{R}/saes/step{{step}}/layer{{layer}}/{{architecture}}/seed{{seed}}/training.parquet",
            step=STEPS,
            layer=LAYERS,
            architecture=ARCHITECTURES,
            seed=SEEDS,
        ),
        spliced=expand(
            f"{R}/metrics/step{{step}}/layer{{layer}}/spliced.json", step=STEPS, layer=LAYERS
        ),
        drift=f"{R}/metrics/drift.json",
        checkpoints=expand(f"{R}/checkpoints/step{{step}}", step=STEPS),
        lm_eval=expand(f"{R}/activations/step{{step}}/layer{LAYERS[0]}/eval.parquet", step=STEPS),
    output:
        expand(f"{R}/tables/{{table}}.parquet", table=TABLES),
    log:
        f"{R}/logs/tables.log",
    benchmark:
        f"{R}/benchmarks/tables.tsv"
    localrule: True
    resources:
        mem_mb=4000,
    params:
        settings=settings("tables"),
        out=parent(),
    shell:
        "PYTHONPATH=src python -m saedynamics tables --settings {params.settings:q} --out {params.out} --inputs {input} > {log} 2>&1"
