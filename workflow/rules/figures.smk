rule figures:
    input:
        tables=expand(f"{R}/tables/{{table}}.parquet", table=TABLES),
        validation=VALIDATION_FILES,
        # cheap rule: re-render when the plotting code changes
        code="src/saedynamics/figures.py",
    output:
        [
            report(
                f"{R}/figures/{name}.{fmt}",
                caption=f"../report/{name}.rst",
                category="Figures",
                labels={"figure": name, "format": fmt},
            )
            for name in FIGURES
            for fmt in CFG.figures.formats
        ]
        + [
            report(
                f"{R}/figures/{name}.{fmt}",
                caption=f"../report/{name}.rst",
                category="Validation",
                labels={"figure": name, "format": fmt},
            )
            for name in VALIDATION_FIGURES
            for fmt in CFG.figures.formats
        ],
    log:
        f"{R}/logs/figures.log",
    benchmark:
        f"{R}/benchmarks/figures.tsv"
    localrule: True
    resources:
        mem_mb=2000,
    params:
        settings=settings("figures"),
        tables=parent(of="input"),
        validation=lambda wc, input: Path(input.validation[0]).parent,
        out=parent(),
    shell:
        "PYTHONPATH=src python -m saedynamics figures --settings {params.settings:q} --tables {params.tables}"
        " --validation {params.validation} --out {params.out}"
        " > {log} 2>&1"
