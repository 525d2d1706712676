rule train:
    input:
        f"{R}/activations/step{{step}}/layer{{layer}}/train.parquet",
    output:
        sae_files("{step}", "{layer}", "{architecture}"),
    log:
        f"{R}/logs/train/step{{step}}/layer{{layer}}/{{architecture}}.log",
    benchmark:
        f"{R}/benchmarks/train/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
    threads: CFG.training.threads or 1
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        settings=settings("train"),
        out=parent(2),
        # checkpoints of a running job: not an output, so a failed job's are kept for its restart
        resume=f"{R}/resume/step{{step}}/layer{{layer}}/{{architecture}}",
    shell:
        "PYTHONPATH=src python -m saedynamics train --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --architecture {wildcards.architecture}"
        " --activations {input} --out {params.out} --resume-dir {params.resume:q} > {log} 2>&1"
