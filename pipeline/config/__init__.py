"""Config schemas shared by the jobs and the Serve app: the mechanics (`schema`) and the model stages (`stages`)."""
