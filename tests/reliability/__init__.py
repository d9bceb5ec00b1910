"""Reliability and security tests: see README.md in this folder."""
