# Measurements per (step, layer, architecture), each over all seeds of the SAE.


rule reconstruction:
    input:
        saes=sae_files("{step}", "{layer}", "{architecture}"),
        eval=f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet",
    output:
        f"{R}/metrics/step{{step}}/layer{{layer}}/{{architecture}}/reconstruction.json",
    log:
        f"{R}/logs/reconstruction/step{{step}}/layer{{layer}}/{{architecture}}.log",
    benchmark:
        f"{R}/benchmarks/reconstruction/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
    resources:
        mem_mb=4000,
    params:
        settings=settings("reconstruction"),
        saes=parent(2, of="input"),
    shell:
        "PYTHONPATH=src python -m saedynamics reconstruction --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --architecture {wildcards.architecture}"
        " --saes {params.saes} --activations {input.eval} --out {output} > {log} 2>&1"


rule consistency:
    input:
        saes=sae_files("{step}", "{layer}", "{architecture}"),
    output:
        f"{R}/metrics/step{{step}}/layer{{layer}}/{{architecture}}/consistency.json",
    log:
        f"{R}/logs/consistency/step{{step}}/layer{{layer}}/{{architecture}}.log",
    benchmark:
        f"{R}/benchmarks/consistency/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
    resources:
        mem_mb=8000,
    params:
        settings=settings("consistency"),
        saes=parent(2, of="input"),
    shell:
        "PYTHONPATH=src python -m saedynamics consistency --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --architecture {wildcards.architecture}"
        " --saes {params.saes} --out {output} > {log} 2>&1"


rule superposition:
    input:
        saes=sae_files("{step}", "{layer}", "{architecture}"),
        eval=f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet",
    output:
        f"{R}/metrics/step{{step}}/layer{{layer}}/{{architecture}}/superposition.json",
    log:
        f"{R}/logs/superposition/step{{step}}/layer{{layer}}/{{architecture}}.log",
    benchmark:
        f"{R}/benchmarks/superposition/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
    resources:
        mem_mb=4000,
    params:
        settings=settings("superposition"),
        saes=parent(2, of="input"),
    shell:
        "PYTHONPATH=src python -m saedynamics superposition --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --architecture {wildcards.architecture}"
        " --saes {params.saes} --activations {input.eval} --out {output} > {log} 2>&1"
