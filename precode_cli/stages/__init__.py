"""The four stages as plain functions: what each command does, callable from Python.

These are the only modules of `precode_cli` that join the core with `attacks` and `defenses`;
the Typer commands in `precode_cli.commands` parse options and call them.
"""
