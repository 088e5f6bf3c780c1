"""Stage tables: Arrow schemas and the run-directory store. No Ray or torch imports."""
