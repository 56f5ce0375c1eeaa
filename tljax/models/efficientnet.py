"""(in progress)"""
PRESETS = {}
