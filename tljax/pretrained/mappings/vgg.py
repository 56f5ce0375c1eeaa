"""(in progress)"""
CONVENTIONS = ()
