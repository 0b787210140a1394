"""Typer signatures and help texts of the four commands; the work is in `precode_cli.stages`.

These modules import only typer and the standard library, so `precode --help` answers fast.
"""
