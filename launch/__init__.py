"""Launchers, installed as `jaxps.launch`: start the processes of a job."""
