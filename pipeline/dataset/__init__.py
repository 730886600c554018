"""Input datasets: reading, validating and sharding the records of a run."""
