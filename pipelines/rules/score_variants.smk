# One rule: score a VCF with a genomamba model. Drop it into any workflow with
#
#   include: "path/to/genomamba/pipelines/rules/score_variants.smk"
#
# and these config keys (paths relative to the working directory):
#   outdir:          where results go (variants.scored.vcf.gz, .tbi, variants.scored.tsv)
#   variant_model:   a model directory from `genomamba fit` (a masked LM gives the zero-shot LLR)
#   variant_fasta:   the reference the VCF was called against (plain or bgzip FASTA)
#   variants:        the VCF/BCF to score
#   variant_window:  bp around each variant (128..1048576)
# Every input record is kept, in order; unscorable ones get a FILTER reason.

rule score_variants:
    input:
        model=config["variant_model"] + "/model.safetensors",
        fasta=config["variant_fasta"],
        vcf=config["variants"],
    output:
        vcf=config["outdir"] + "/variants.scored.vcf.gz",
        tbi=config["outdir"] + "/variants.scored.vcf.gz.tbi",
        tsv=config["outdir"] + "/variants.scored.tsv",
    log:
        config["outdir"] + "/logs/score_variants.log",
    params:
        model=config["variant_model"],
        window=config["variant_window"],
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "genomamba score-variants --model {params.model} --fasta {input.fasta} --vcf {input.vcf} "
        "--window {params.window} --out {output.vcf} --tsv {output.tsv} > {log} 2>&1"
