"""Stage two: from the feature table to the stacker's predictions. Imports no torch and no transformers: it runs
on features alone (a test checks it)."""
