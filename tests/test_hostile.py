"""Hostile input found after the first hardening pass: each case a class, tested as one."""

from __future__ import annotations
