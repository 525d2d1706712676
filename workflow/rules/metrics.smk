# The measurements of one (step, layer, architecture) over all its seeds: reconstruction and
# sparsity, seed consistency, superposition. One job writes the three files: they read the same
# SAEs and eval activations, and a job's start-up (importing torch) would otherwise dominate.


rule measure:
    input:
        saes=sae_files("{step}", "{layer}", "{architecture}"),
        eval=f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet",
    output:
        expand(
            f"{R}/metrics/step{{step}}/layer{{layer}}/{{architecture}}/{{metric}}.json",
            metric=METRICS,
            allow_missing=True,
        ),
    log:
        f"{R}/logs/measure/step{{step}}/layer{{layer}}/{{architecture}}.log",
    benchmark:
        f"{R}/benchmarks/measure/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
    resources:
        mem_mb=8000,
    params:
        settings=settings("measure"),
        saes=parent(2, of="input"),
        out=parent(),
    shell:
        "PYTHONPATH=src python -m saedynamics measure --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --architecture {wildcards.architecture}"
        " --saes {params.saes} --activations {input.eval} --out {params.out} > {log} 2>&1"
