"""The playground: models side by side on one prompt, validation samples, the rendered template, batch compare."""
