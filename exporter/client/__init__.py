"""`meshlens observe|stat|routes|edges|top|tap|servicemap`: the CLI client commands over the REST API."""
