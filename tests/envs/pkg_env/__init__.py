"""An Atropos env inside a package: ``python -m pkg_env.env serve ...`` with this package's parent folder on the import
path (a launcher entry ``module: pkg_env.env``, ``pythonpath: [tests/envs]``)."""
