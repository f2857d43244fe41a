"""flare.benchmarks"""
