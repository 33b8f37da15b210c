"""The run store: SQLAlchemy 2.0 models, engine set-up, repository functions, migrations."""
