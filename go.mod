module loginserver

go 1.27.0

require golang.org/x/crypto v0.59.0
