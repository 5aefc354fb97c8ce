"""dask.distributed clusters whose workers are gridcouple batch jobs (docs/dask.md): the code
behind :mod:`gridcouple.dask`, which names what to import."""
