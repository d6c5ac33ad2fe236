/* sampler.c - to be written */
