"""flare.runtime"""
