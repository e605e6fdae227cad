"""Turning stored result rows into tables, figures and report.md."""
