"""The relational store: schema, migrations, engine and sessions."""
