"""flare.train"""
