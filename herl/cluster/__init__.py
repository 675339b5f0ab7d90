"""Where trainer ranks and engines run when `cluster.backend = "ray"`: Ray actors placed on
a Ray cluster, while the Prefect flow, the stages and every table stay in the driver
(the process that runs the flow, on the head node).

- ray_backend.py  joining the cluster (`connect`), a group of actors placed together or
                  not at all (`PlacedGroup`: one placement group, one actor per bundle,
                  each running a herl function named by module and name), the check
                  that every placed actor sees the run folder, and the trainer ranks as
                  one job (`RayTrainerJob`: one torch.distributed process group, the
                  resident trainer's loop in each rank).

This package knows nothing of training or generation: the trainer service and the engines
say which of their functions a placed actor runs. Ray is an optional extra
(`pip install 'herl[ray]'`); nothing here imports it until a run asks for it.
"""
