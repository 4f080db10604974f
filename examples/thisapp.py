"""The servlets of the 2001 PyServ description, in Python 3 syntax."""


class TestServlet:
    def run(self, request, response):
        # Content type defaults to 'text/plain'
        response.write("Hi!\n")
        visits = self.session.get("visits", 0)  # sessions look like dicts
        write = response.write
        write("\n")
        write("%d previous visits" % visits)
        self.session["visits"] = visits + 1
        write("\n\n")
        write("The request is: ")
        write(repr(request))
        write("\n")
        write("The headers are: ")
        write(repr(request.headers))
        write("\n")
        write("The environment vars are: ")
        write(repr(request.environ))
        write("\n")
