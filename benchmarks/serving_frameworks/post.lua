wrk.method = "POST"
wrk.body = '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["a fine movie, really"]}]}'
wrk.headers["Content-Type"] = "application/json"
