"""Journal → verdict: reading journals, lifetimes, leak or bloat, the report. Pure; no framework."""
