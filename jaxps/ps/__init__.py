"""The host parameter server: tables larger than accelerator memory, held in host RAM of a
server group (Li et al., OSDI 2014). Nothing here imports JAX: a server process starts
fast and holds no accelerator."""
