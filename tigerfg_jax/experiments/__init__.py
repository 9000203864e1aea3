"""Experiment drivers that run several training stages and report them together.

`paper_table`: the ablation table of the paper's claims on the synthetic benchmark.
"""
