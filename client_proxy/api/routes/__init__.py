"""Thin routes: parse, call the fan-out, shape the answer."""
