# One job per (step, layer) trains every architecture x seed from one read of its activations
# (training.py): the cached train split, or with training.source stream the checkpoint run over the
# token sample inside the job (streaming.py). training.split_by_architecture: true makes it one job
# per architecture instead.
# Resume checkpoints of a running job go to resume/...: not an output, so a failed job's are kept
# for its restart ("_all" is no architecture name: those are slugs, so the folders cannot clash).
if CFG.training.split_by_architecture:

    rule train:
        input:
            unpack(train_input),
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
            data=train_input_args,
            out=parent(3),
            resume=f"{R}/resume/step{{step}}/layer{{layer}}/{{architecture}}",
        shell:
            "PYTHONPATH=src python -m saedynamics train --settings {params.settings:q} --threads {threads}"
            " --step {wildcards.step} --layer {wildcards.layer} {params.data}"
            " --out {params.out} --resume-dir {params.resume:q} > {log} 2>&1"

else:

    rule train:
        input:
            unpack(train_input),
        output:
            [f for a in ARCHITECTURES for f in sae_files("{step}", "{layer}", a)],
        log:
            f"{R}/logs/train/step{{step}}/layer{{layer}}.log",
        benchmark:
            f"{R}/benchmarks/train/step{{step}}/layer{{layer}}.tsv"
        threads: CFG.training.threads or 1
        resources:
            gpu=1,
            mem_mb=8000,
        params:
            settings=settings("train"),
            data=train_input_args,
            out=parent(3),
            resume=f"{R}/resume/step{{step}}/layer{{layer}}/_all",
        shell:
            "PYTHONPATH=src python -m saedynamics train --settings {params.settings:q} --threads {threads}"
            " --step {wildcards.step} --layer {wildcards.layer} {params.data}"
            " --out {params.out} --resume-dir {params.resume:q} > {log} 2>&1"
