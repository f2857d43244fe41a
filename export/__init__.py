"""flare.export"""
