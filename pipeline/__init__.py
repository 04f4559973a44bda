"""Pipeline definition, settings and runners."""

