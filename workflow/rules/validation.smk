# The metrics against known ground truth on toy models, at every run (toy.py): effective features
# on toy models of superposition, PW-MCC against ground-truth recovery on the model organism. Its
# figures are drawn by the figures rule, with the others (a style change re-draws them all).


rule validation:
    input:
        code="src/saedynamics/toy.py",
    output:
        VALIDATION_FILES,
    log:
        f"{R}/logs/validation.log",
    benchmark:
        f"{R}/benchmarks/validation.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        settings=settings("validation"),
        out=parent(),
    shell:
        "PYTHONPATH=src python -m saedynamics validation --settings {params.settings:q}"
        " --threads {threads} --out {params.out} > {log} 2>&1"
