"""qmpc's own tasks: each MJCF model in ``models/`` is owned by one module here, which reads its
state by name and knows its theory (dynamics and cost in closed form)."""

from qmpc.tasks.point_mass import PointMassEnv

__all__ = ["PointMassEnv"]
