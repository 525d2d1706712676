# The measurements of SAEs of one (step, layer), all seeds: reconstruction and sparsity, seed
# consistency, superposition, three files per architecture. One job per (step, layer), as training
# (training.split_by_architecture: one per architecture): the eval activations are read once, and
# a job's start-up (importing torch) would otherwise dominate.
if CFG.training.split_by_architecture:

    rule measure:
        input:
            saes=sae_files("{step}", "{layer}", "{architecture}"),
            eval=f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet",
        output:
            metric_files("{step}", "{layer}", "{architecture}"),
        log:
            f"{R}/logs/measure/step{{step}}/layer{{layer}}/{{architecture}}.log",
        benchmark:
            f"{R}/benchmarks/measure/step{{step}}/layer{{layer}}/{{architecture}}.tsv"
        resources:
            mem_mb=8000,
        params:
            settings=settings("measure"),
            saes=parent(3, of="input"),
            out=parent(2),
        shell:
            "PYTHONPATH=src python -m saedynamics measure --settings {params.settings:q} --threads {threads}"
            " --step {wildcards.step} --layer {wildcards.layer} --architectures {wildcards.architecture}"
            " --saes {params.saes} --activations {input.eval} --out {params.out} > {log} 2>&1"

else:

    rule measure:
        input:
            saes=[f for a in ARCHITECTURES for f in sae_files("{step}", "{layer}", a)],
            eval=f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet",
        output:
            [f for a in ARCHITECTURES for f in metric_files("{step}", "{layer}", a)],
        log:
            f"{R}/logs/measure/step{{step}}/layer{{layer}}.log",
        benchmark:
            f"{R}/benchmarks/measure/step{{step}}/layer{{layer}}.tsv"
        resources:
            mem_mb=8000,
        params:
            settings=settings("measure"),
            saes=parent(3, of="input"),
            out=parent(2),
            architectures=" ".join(ARCHITECTURES),
        shell:
            "PYTHONPATH=src python -m saedynamics measure --settings {params.settings:q} --threads {threads}"
            " --step {wildcards.step} --layer {wildcards.layer} --architectures {params.architectures}"
            " --saes {params.saes} --activations {input.eval} --out {params.out} > {log} 2>&1"


# Every SAE of one (step, layer) spliced into that checkpoint's LM: loads the model once.
rule splice:
    input:
        checkpoint=f"{R}/checkpoints/step{{step}}",
        tokens=f"{R}/tokens",
        saes=lambda wc: [
            f
            for a in ARCHITECTURES
            for f in sae_files(wc.step, wc.layer, a)
            if f.endswith(".json")
        ],
    output:
        f"{R}/metrics/step{{step}}/layer{{layer}}/spliced.json",
    log:
        f"{R}/logs/splice/step{{step}}/layer{{layer}}.log",
    benchmark:
        f"{R}/benchmarks/splice/step{{step}}/layer{{layer}}.tsv"
    threads: 1  # as activations: loading dominates at small scale, a GPU does the work at scale
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        settings=settings("splice"),
        saes=lambda wc, input: sorted({str(Path(f).parents[1]) for f in input.saes}),
    shell:
        "PYTHONPATH=src python -m saedynamics splice --settings {params.settings:q} --threads {threads}"
        " --step {wildcards.step} --layer {wildcards.layer} --checkpoint {input.checkpoint}"
        " --tokens {input.tokens} --saes {params.saes} --out {output} > {log} 2>&1"


# How each SAE's decoder moves across checkpoints (same architecture, layer and seed), and which
# of its alive latents are kept, lost and born between consecutive checkpoints.
rule drift:
    input:
        saes=[
            f
            for s in STEPS
            for l in LAYERS
            for a in ARCHITECTURES
            for f in sae_files(s, l, a)
            if f.endswith("cfg.json")
        ],
        # latent_density per seed: which latents are alive (born / kept / lost between steps)
        reconstruction=[
            f
            for s in STEPS
            for l in LAYERS
            for a in ARCHITECTURES
            for f in metric_files(s, l, a)
            if f.endswith("reconstruction.json")
        ],
    output:
        f"{R}/metrics/drift.json",
    log:
        f"{R}/logs/drift.log",
    benchmark:
        f"{R}/benchmarks/drift.tsv"
    resources:
        mem_mb=8000,
    params:
        settings=settings("drift"),
    shell:
        "PYTHONPATH=src python -m saedynamics drift --settings {params.settings:q}"
        " --saes {input.saes} --reconstruction {input.reconstruction} --out {output} > {log} 2>&1"
