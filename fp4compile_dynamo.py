"""Entry point of the `fp4` backend for dynamo's `torch_dynamo_backends` group.

It lives outside the `fp4compile` package on purpose: dynamo registers what the
entry point loads under the name "fp4", and importing `fp4compile` itself
registers "fp4" too, which dynamo would reject as a duplicate. Loading this module
imports nothing; the first compile imports the package.
"""


def fp4(gm, example_inputs, **kwargs):
    from fp4compile.backend import fp4_backend

    return fp4_backend(gm, example_inputs, **kwargs)
