"""Launchers, installed as `jaxps.launch`: start the processes of a job.

local     `jaxps launch local`: servers and workers on this machine, on loopback
node      `jaxps launch node`: what every task/pod/host of a cluster job runs
layout    the rank layout and the JAXPS_* environment of each role (pure functions)
nodelist  SLURM host lists
render    `jaxps launch slurm|k8s|tpu`: the templates in templates/
"""
