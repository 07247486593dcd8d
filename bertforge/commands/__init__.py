"""One module per command, each reading setup -> fit -> export."""
