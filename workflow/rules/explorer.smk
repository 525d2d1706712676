# The static feature explorer: the latents of each (layer, architecture)'s final SAE, followed back
# through training by decoder matching, with their top eval contexts, activation histograms, the
# tokens they promote and their partners in the other seeds (src/saedynamics/explorer/). It opens
# from the file system: results/<study>/explorer/index.html.


rule explorer:
    input:
        saes=[
            f
            for s in STEPS
            for l in LAYERS
            for a in ARCHITECTURES
            for f in sae_files(s, l, a)
            if not f.endswith("training.parquet")
        ],
        eval=expand(
            f"{R}/activations/step{{step}}/layer{{layer}}/eval.parquet", step=STEPS, layer=LAYERS
        ),
        checkpoints=expand(f"{R}/checkpoints/step{{step}}", step=STEPS),
        tables=expand(
            f"{R}/tables/{{table}}.parquet", table=["reconstruction", "consistency", "checkpoints"]
        ),
        # cheap next to training: re-build when the explorer's code, pages or styles change
        code=EXPLORER_CODE,
    output:
        site=directory(EXPLORER),
        # the site's first page as one file: a pure HTML report cannot hold a directory
        front_page=report(
            f"{EXPLORER}.html",
            caption="../report/explorer.rst",
            category="Explorer",
            labels={"figure": "explorer", "format": "html"},
        ),
    log:
        f"{R}/logs/explorer.log",
    benchmark:
        f"{R}/benchmarks/explorer.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        settings=settings("explorer"),
        cfgs=lambda wc, input: [f for f in input.saes if f.endswith("cfg.json")],
        tables=lambda wc, input: Path(input.tables[0]).parent,
    shell:
        "PYTHONPATH=src python -m saedynamics explorer --settings {params.settings:q} --threads {threads}"
        " --saes {params.cfgs} --eval {input.eval} --checkpoints {input.checkpoints}"
        " --tables {params.tables} --out {output.site} --front-page {output.front_page} > {log} 2>&1"
