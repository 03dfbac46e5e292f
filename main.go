// Command loginserver is a small, complete password login server: a port of
// the "login endpoint" chapter of a FastAPI course. Users register with an
// email and a password (kept as a bcrypt hash), log in with the same pair,
// and get an OAuth2-style bearer token that opens /users/me.
//
// This file holds the program, the routes and the handlers, then the
// defenses around them. run builds the server; newServer names the routes;
// each handle* function reads the request, calls into auth.go, jwt.go or
// store.go, and answers with writeJSON or writeError.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"
)

// maxBodyBytes caps every request body.
const maxBodyBytes = 64 << 10

func main() {
	if err := run(context.Background(), os.Args[1:], os.LookupEnv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "loginserver:", err)
		os.Exit(1)
	}
}

// run is the whole program: it reads its configuration from args and the
// environment, loads the users, and serves until ctx ends or the process
// gets SIGINT or SIGTERM; then it lets requests in flight finish.
func run(ctx context.Context, args []string, lookupEnv func(string) (string, bool), stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	flags := flag.NewFlagSet("loginserver", flag.ContinueOnError)
	flags.SetOutput(stderr)
	addr := flags.String("addr", "localhost:8080", "address to listen on")
	usersPath := flags.String("users", "users.json", "file that stores the users (created on the first registration)")
	maxPerAccount := flags.Int("max-failures-per-account", 5, "failed logins for one client address and email in 15 minutes before logins are refused (0: no limit)")
	maxPerAddress := flags.Int("max-failures-per-address", 100, "failed logins for one client address in 15 minutes before logins are refused (0: no limit)")
	maxConns := flags.Int("max-connections-per-address", 64, "open connections allowed for one client address; more are closed at once (0: no limit)")
	var web webConfig
	flags.Func("allow-origin", "an origin, such as http://localhost:5173, whose pages may call the API (CORS); may be repeated", func(origin string) error {
		if origin == "*" {
			return errors.New("* would let every page on the web log in as its visitors and lock them out: name each origin")
		}
		if err := http.NewCrossOriginProtection().AddTrustedOrigin(origin); err != nil {
			return err // not scheme://host[:port]
		}
		web.allowOrigins = append(web.allowOrigins, origin)
		return nil
	})
	flags.Func("allow-host", "a host name to answer to besides localhost and loopback addresses; may be repeated", func(host string) error {
		if strings.ContainsAny(host, "/: ") && net.ParseIP(host) == nil {
			return errors.New("want a host name alone, such as myhost.local: no scheme, no port")
		}
		web.allowHosts = append(web.allowHosts, strings.ToLower(host))
		return nil
	})
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *maxPerAccount < 0 || *maxPerAddress < 0 || *maxConns < 0 {
		return errors.New("-max-failures-per-account, -max-failures-per-address and -max-connections-per-address must be 0 (no limit) or more")
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))

	secret, err := loadSecret(lookupEnv, logger)
	if err != nil {
		return err
	}
	// Loading many users and timing a costly hash take a while; a signal
	// meanwhile stops the program at once.
	var accts *accounts
	loaded := make(chan error, 1)
	go func() {
		users, err := openStore(*usersPath, logger)
		if err == nil {
			limiter := newLoginLimiter(*maxPerAccount, *maxPerAddress, time.Now)
			accts, err = newAccounts(users, limiter, newCPUSlots(), bcrypt.DefaultCost, logger)
		}
		loaded <- err
	}()
	select {
	case err := <-loaded:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		logger.Info("stopped while starting")
		return nil
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	web.checkHost = ln.Addr().(*net.TCPAddr).IP.IsLoopback() || len(web.allowHosts) > 0
	srv := newHTTPServer(newServer(logger, accts, secret, time.Now, web), logger)
	logger.Info("listening", "addr", ln.Addr().String(), "users", *usersPath)
	return serve(ctx, srv, limitConnections(ln, *maxConns), logger)
}

// newServer returns the server's handler: the routes, each inside the
// defenses it needs, and around them all the request log, the headers of
// every response, the origins and hosts web allows, and the mux's own 404
// and 405 in JSON.
func newServer(logger *slog.Logger, accts *accounts, secret []byte, now func() time.Time, web webConfig) http.Handler {
	crossSite := refuseCrossSite(web.allowOrigins)
	mux := http.NewServeMux()
	// accounts.register and accounts.login add the CPU slots and the throttle.
	mux.Handle("POST /register", crossSite(handleRegister(logger, accts)))
	mux.Handle("POST /login", crossSite(handleLogin(logger, accts, secret, now)))
	mux.Handle("GET /users/me", requireUser(accts.users, secret, now, handleUsersMe))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /openapi.json", handleFile("application/json", "", openAPIJSON))
	mux.Handle("GET /docs", handleFile("text/html; charset=utf-8", docsPolicy, docsPage))
	// Around every route, outermost first.
	return logRequests(logger, commonHeaders(checkHost(web,
		allowOrigins(web.allowOrigins, mux, routingErrorsInJSON(mux)))))
}

// handleRegister creates a user from {"email", "password"}.
func handleRegister(logger *slog.Logger, accts *accounts) http.Handler {
	type response struct {
		ID    int64  `json:"id"`
		Email string `json:"email"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		email, password, ok := readJSONCredentials(w, r)
		if !ok {
			return
		}
		u, err := accts.register(r.Context(), email, password)
		if err != nil {
			writeAccountsError(w, logger, err)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusCreated, response{ID: u.ID, Email: u.Email})
	})
}

// handleLogin exchanges an email and a password for an access token, from
// the tutorial's JSON body or the OAuth2 password form (RFC 6749 section
// 4.3) that OAuth2 clients and FastAPI's OAuth2PasswordRequestForm send.
func handleLogin(logger *slog.Logger, accts *accounts, secret []byte, now func() time.Time) http.Handler {
	type response struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
		ExpiresIn   int64  `json:"expires_in"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var email, password string
		var ok bool
		switch t := mediaType(r); {
		case t == "application/x-www-form-urlencoded":
			email, password, ok = readFormCredentials(w, r)
		case isJSON(t):
			email, password, ok = readJSONCredentials(w, r)
		default:
			writeError(w, http.StatusUnsupportedMediaType,
				"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)")
			return
		}
		if !ok {
			return
		}
		u, err := accts.login(r.Context(), clientAddr(r.RemoteAddr), email, password)
		if err != nil {
			writeAccountsError(w, logger, err)
			return
		}
		// A token must not be kept by any cache (RFC 6749 section 5.1).
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("Pragma", "no-cache")
		writeJSON(w, http.StatusOK, response{
			AccessToken: createAccessToken(u.Email, secret, now()),
			TokenType:   "bearer",
			ExpiresIn:   int64(accessTokenLifetime / time.Second),
		})
	})
}

// handleUsersMe answers the user the request's token was issued to.
func handleUsersMe(w http.ResponseWriter, r *http.Request, u User) {
	type response struct {
		ID    int64  `json:"id"`
		Email string `json:"email"`
	}
	writeJSON(w, http.StatusOK, response{ID: u.ID, Email: u.Email})
}

// requireUser does for a route what FastAPI's Depends(get_current_user)
// does: it calls next with the user of the request's bearer token, or
// answers 401 itself. So a protected route is next's own work, and no more.
func requireUser(users *store, secret []byte, now func() time.Time, next func(http.ResponseWriter, *http.Request, User)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, err := currentUser(r, users, secret, now())
		switch {
		case errors.Is(err, errNotAuthenticated):
			// No credentials sent: no error code (RFC 6750 section 3).
			w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
			writeError(w, http.StatusUnauthorized, "Not authenticated")
		case err != nil:
			w.Header().Set("WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
			writeError(w, http.StatusUnauthorized, "Could not validate credentials")
		default:
			w.Header().Set("Cache-Control", "no-store") // a user's data follows
			next(w, r, u)
		}
	})
}

// errNotAuthenticated is a request that sent no bearer token.
var errNotAuthenticated = errors.New("no bearer token")

// currentUser returns the user whose bearer token the request carries: the
// chapter's get_current_user, reading "Authorization: Bearer <token>" as
// OAuth2PasswordBearer does (the scheme in any letter case). Without it:
// errNotAuthenticated; a token that fails a check, or whose user is gone:
// an error wrapping errInvalidToken.
func currentUser(r *http.Request, users *store, secret []byte, now time.Time) (User, error) {
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return User{}, errNotAuthenticated
	}
	email, err := verifyAccessToken(strings.TrimLeft(token, " "), secret, now)
	if err != nil {
		return User{}, err
	}
	u, found := users.lookup(email)
	if !found {
		return User{}, fmt.Errorf("%w: user %q no longer exists", errInvalidToken, email)
	}
	return u, nil
}

// handleHealthz says the server is up; it runs only once the store is loaded.
func handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// openAPIJSON is the API's description, the repository's openapi.json,
// served as it is at /openapi.json. (A string, so that nothing can change it.)
//
//go:embed openapi.json
var openAPIJSON string

// docsPage is Swagger UI for /openapi.json, as FastAPI's /docs, loaded from
// a public CDN. Passwords are typed into it, on the API's own origin, so
// what it loads is pinned: an exact version, each file with its SHA-384
// (Subresource Integrity), which the browser checks before using it.
const docsPage = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>loginserver API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css"
  integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js"
  integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9" crossorigin="anonymous"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body>
</html>
`

// docsPolicy is docsPage's Content-Security-Policy: scripts only from the
// pinned Swagger UI and the inline one, by its SHA-256; styles from there
// and inline, as Swagger UI draws; requests to this server; no framing.
const docsPolicy = "default-src 'none'; " +
	"script-src https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/ 'sha256-Oz8ONi45cXTL2h66ERH2497UbGxVL1Oox4TEI52B/SQ='; " +
	"style-src https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/ 'unsafe-inline'; " +
	"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// handleFile serves content, fixed at build time, as the given type and
// with the given Content-Security-Policy, if any.
func handleFile(contentType, policy, content string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		if policy != "" {
			w.Header().Set("Content-Security-Policy", policy)
		}
		io.WriteString(w, content)
	})
}

// readJSONCredentials reads {"email": "...", "password": "..."}, ignoring
// other members, as FastAPI does; else it writes the error and returns false.
func readJSONCredentials(w http.ResponseWriter, r *http.Request) (email, password string, ok bool) {
	if !isJSON(mediaType(r)) {
		writeError(w, http.StatusUnsupportedMediaType, "body must be JSON, sent with Content-Type: application/json")
		return "", "", false
	}
	body, ok := readBody(w, r)
	if !ok {
		return "", "", false
	}
	object, err := decodeObject(body)
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, "body "+err.Error())
		return "", "", false
	}
	email, isEmail := object["email"].(string)
	password, isPassword := object["password"].(string)
	switch {
	case !isEmail:
		writeError(w, http.StatusUnprocessableEntity, "email is required and must be a string")
		return "", "", false
	case !isPassword:
		writeError(w, http.StatusUnprocessableEntity, "password is required and must be a string")
		return "", "", false
	case strings.ContainsRune(email+password, utf8.RuneError):
		// What an escaped half of a surrogate pair ("\ud800") decodes to:
		// refused, so that different inputs never become one password.
		writeError(w, http.StatusUnprocessableEntity, "email and password must be valid Unicode text (no U+FFFD)")
		return "", "", false
	}
	return email, password, true
}

// readFormCredentials reads an OAuth2 password grant form: username,
// password, and grant_type=password if any; else it writes the error and
// returns false.
func readFormCredentials(w http.ResponseWriter, r *http.Request) (email, password string, ok bool) {
	body, ok := readBody(w, r)
	if !ok {
		return "", "", false
	}
	// What curl -d '{...}' sends without a Content-Type header: say so,
	// rather than that username is missing.
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("{")) {
		writeError(w, http.StatusUnsupportedMediaType, "body looks like JSON: send it with Content-Type: application/json")
		return "", "", false
	}
	// The body alone, never the URL's query: a password must not be in a URL.
	form, err := url.ParseQuery(string(body))
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, "body is not a valid form")
		return "", "", false
	}
	if grant, present := form["grant_type"]; present && (len(grant) != 1 || grant[0] != "password") {
		writeError(w, http.StatusBadRequest, "unsupported grant_type")
		return "", "", false
	}
	// As for JSON: not UTF-8, or a field given twice, is refused.
	for name, values := range form {
		if !utf8.ValidString(name) || slices.ContainsFunc(values, func(v string) bool { return !utf8.ValidString(v) }) {
			writeError(w, http.StatusUnprocessableEntity, "body must be valid UTF-8")
			return "", "", false
		}
	}
	for _, field := range []string{"username", "password"} {
		if len(form[field]) != 1 {
			writeError(w, http.StatusUnprocessableEntity, field+" is required, once")
			return "", "", false
		}
	}
	return form.Get("username"), form.Get("password"), true
}

// readBody reads a request body of at most 64 KiB. If it is larger, it
// writes the 413 and returns false.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if maxErr := (*http.MaxBytesError)(nil); errors.As(err, &maxErr) {
		writeError(w, http.StatusRequestEntityTooLarge, "body must be at most 64 KiB")
		return nil, false
	}
	if err != nil {
		// The client stopped sending, or sent a broken chunked body.
		writeError(w, http.StatusUnprocessableEntity, "body could not be read")
		return nil, false
	}
	return body, true
}

// isJSON reports whether a media type is JSON: application/json, or a
// JSON-based type such as application/merge-patch+json, as FastAPI accepts.
func isJSON(mediaType string) bool {
	return mediaType == "application/json" ||
		strings.HasPrefix(mediaType, "application/") && strings.HasSuffix(mediaType, "+json")
}

// mediaType returns the request's Content-Type without parameters, or "".
func mediaType(r *http.Request) string {
	t, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return t
}

// writeError writes an error in FastAPI's shape: {"detail": "..."}.
func writeError(w http.ResponseWriter, status int, detail string) {
	writeJSON(w, status, struct {
		Detail string `json:"detail"`
	}{detail})
}

// writeAccountsError answers an error from a registration or a login.
func writeAccountsError(w http.ResponseWriter, logger *slog.Logger, err error) {
	var invalid validationError
	var throttled *throttledError
	switch {
	case errors.As(err, &invalid):
		writeError(w, http.StatusUnprocessableEntity, invalid.Error())
	case errors.Is(err, errEmailTaken):
		writeError(w, http.StatusConflict, "Email already registered")
	case errors.Is(err, errInvalidCredentials):
		// The same answer for an unknown email and a wrong password.
		w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
		writeError(w, http.StatusUnauthorized, "Invalid email or password")
	case errors.As(err, &throttled):
		w.Header().Set("Retry-After", strconv.Itoa(int(throttled.retryAfter/time.Second)))
		writeError(w, http.StatusTooManyRequests, "Too many failed login attempts, try again later")
	case errors.Is(err, errServerBusy), errors.Is(err, errStoreBusy):
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "Server busy, try again later")
	default: // the disk failed: the log says how; the client must not
		logger.Error("request failed", "err", err)
		writeError(w, http.StatusInternalServerError, "Internal server error")
	}
}

// writeJSON writes v as a JSON response: headers, then status, then body.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	// The status is sent; an error here is a client that went away.
	_ = json.NewEncoder(w).Encode(v)
}

// loadSecret returns the token signing secret from JWT_SECRET. Unset, it
// makes a random one for this process; set but too short, it is an error.
func loadSecret(lookupEnv func(string) (string, bool), logger *slog.Logger) ([]byte, error) {
	secret, ok := lookupEnv("JWT_SECRET")
	if !ok {
		logger.Warn("JWT_SECRET is not set: using a random secret, so tokens will not survive a restart")
		random := make([]byte, minSecretBytes)
		rand.Read(random) // never fails: it crashes the program rather than return weak bytes
		return random, nil
	}
	if len(secret) < minSecretBytes {
		return nil, fmt.Errorf("JWT_SECRET is %d bytes long; it must be at least %d", len(secret), minSecretBytes)
	}
	return []byte(secret), nil
}

// shutdownGrace is how long requests in flight may take to finish.
const shutdownGrace = 5 * time.Second

// serve serves srv on ln until ctx ends; then it stops accepting, and lets
// the requests in flight finish for up to shutdownGrace.
func serve(ctx context.Context, srv *http.Server, ln net.Listener, logger *slog.Logger) error {
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}

	logger.Info("shutting down: finishing requests in flight")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		logger.Warn("requests still in flight were cut off", "err", err)
		srv.Close()
	}
	<-serveErr // http.ErrServerClosed, once Serve has returned
	logger.Info("stopped")
	return nil
}

// routingErrorsInJSON answers in JSON, as FastAPI does, what the mux
// answers itself: 404 for an unknown path, and 405 for a known path with
// another method, its Allow header kept.
func routingErrorsInJSON(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern == "" { // no route: the mux answers
			w = &routingErrorWriter{w}
		}
		mux.ServeHTTP(w, r)
	})
}

// routingErrorWriter turns the mux's plain-text error into {"detail": ...},
// with the same status and headers.
type routingErrorWriter struct{ http.ResponseWriter }

func (w *routingErrorWriter) WriteHeader(status int) {
	writeError(w.ResponseWriter, status, http.StatusText(status))
}

func (w *routingErrorWriter) Write(p []byte) (int, error) { return len(p), nil } // the plain text

// commonHeaders sets the headers every response carries, the mux's own 404
// and 405 included.
func commonHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Browsers must take a response for what its Content-Type says,
		// and no page of another site may frame one (clickjacking).
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Frame-Options", "DENY")
		next.ServeHTTP(w, r)
	})
}

// logRequests logs one line per request: method, path, status, duration.
// Never a header or a body, which may hold a password or a token.
func logRequests(logger *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		logger.Info("request", "method", r.Method, "path", r.URL.Path,
			"status", rec.status, "duration", time.Since(start))
	})
}

// statusRecorder remembers the status a handler wrote, for the log.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (rec *statusRecorder) WriteHeader(status int) {
	rec.status = status
	rec.ResponseWriter.WriteHeader(status)
}

// The defenses begin here.

// webConfig says which pages of other origins, and which host names, the
// server trusts besides its own.
type webConfig struct {
	allowOrigins []string // exact origins whose pages may call the API, from -allow-origin
	allowHosts   []string // host names accepted besides loopback ones, from -allow-host
	checkHost    bool     // refuse other host names: listening on loopback, or -allow-host given
}

// refuseCrossSite returns a wrapper that answers 403, before anything else
// runs, to a request a browser marks as sent by a page of another site
// (Sec-Fetch-Site, or an Origin that is not the Host) and not trusted: so
// a hostile page cannot make its visitors fail five logins and be locked
// out. Clients that are not browsers send neither header, and pass.
func refuseCrossSite(trusted []string) func(http.Handler) http.Handler {
	c := http.NewCrossOriginProtection()
	for _, origin := range trusted {
		if err := c.AddTrustedOrigin(origin); err != nil {
			panic(err) // run's -allow-origin checked each with this same call
		}
	}
	c.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "Cross-origin request refused")
	}))
	return c.Handler
}

// allowOrigins lets pages of the given origins call the API (CORS): their
// preflight OPTIONS is answered with what the route allows, and every
// answer, errors included, lets the page read it, WWW-Authenticate and
// Retry-After too. No credentials mode: the token is a header, never a
// cookie. Other origins get no such header, so browsers hide the answers.
func allowOrigins(origins []string, mux *http.ServeMux, next http.Handler) http.Handler {
	if len(origins) == 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Vary", "Origin") // caches must not give one origin's answer to another
		origin := r.Header.Get("Origin")
		if !slices.Contains(origins, origin) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", origin)
		w.Header().Set("Access-Control-Expose-Headers", "WWW-Authenticate, Retry-After")
		methods := routeMethods(mux, r.URL)
		if r.Method != http.MethodOptions || len(methods) == 0 { // not a preflight, or an unknown path
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Access-Control-Allow-Methods", strings.Join(methods, ", "))
		w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
		w.Header().Set("Access-Control-Max-Age", "600")
		w.WriteHeader(http.StatusNoContent)
	})
}

// routeMethods returns the methods the mux has a route for at u's path.
func routeMethods(mux *http.ServeMux, u *url.URL) []string {
	var methods []string
	for _, method := range []string{"GET", "POST", "PUT", "PATCH", "DELETE"} {
		if _, pattern := mux.Handler(&http.Request{Method: method, URL: u}); pattern != "" {
			methods = append(methods, method)
		}
	}
	return methods
}

// checkHost answers 400, before anything else runs, to a request whose Host
// is neither a loopback name (localhost, 127.x.x.x, [::1], any port) nor in
// web.allowHosts: a page on the internet can point its own domain at
// 127.0.0.1 (DNS rebinding), and its requests then reach this server as
// same-origin. Listening elsewhere, with no -allow-host, any Host passes.
func checkHost(web webConfig, next http.Handler) http.Handler {
	if !web.checkHost {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		host = strings.ToLower(strings.Trim(host, "[]"))
		ip := net.ParseIP(host)
		if host != "localhost" && (ip == nil || !ip.IsLoopback()) && !slices.Contains(web.allowHosts, host) {
			writeError(w, http.StatusBadRequest, "Invalid host header")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// clientAddr returns the host of a connection's remote address. Proxy
// headers such as X-Forwarded-For are not trusted: any client can set them.
func clientAddr(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	return host
}

// newHTTPServer returns the HTTP server for handler, with the limits that
// keep a slow or greedy client from holding a connection for long.
func newHTTPServer(handler http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 5 * time.Second, // a client that trickles its headers (Slowloris)
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		// Go reads 4 KiB more: 16 KiB for the request line and headers,
		// room for a token (8 KiB at most) and ordinary headers.
		MaxHeaderBytes: 12 << 10,
		ErrorLog:       slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
}

// limitConnections caps each client address's open connections at max (0:
// no cap), closing one over it at once: one client cannot take the file
// descriptors and memory others need.
func limitConnections(ln net.Listener, max int) net.Listener {
	if max == 0 {
		return ln
	}
	return &connLimiter{Listener: ln, max: max, open: make(map[string]int)}
}

// connLimiter is a listener that counts each client address's connections.
type connLimiter struct {
	net.Listener
	max int

	mu   sync.Mutex     // guards open
	open map[string]int // open connections by client address
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := clientAddr(conn.RemoteAddr().String())
		l.mu.Lock()
		admitted := l.open[addr] < l.max
		if admitted {
			l.open[addr]++
		}
		l.mu.Unlock()
		if admitted {
			return &countedConn{Conn: conn, limiter: l, addr: addr}, nil
		}
		conn.Close()
	}
}

// countedConn gives its place back to its address's count when closed.
type countedConn struct {
	net.Conn
	limiter *connLimiter
	addr    string
	once    sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.limiter.mu.Lock()
		defer c.limiter.mu.Unlock()
		if c.limiter.open[c.addr]--; c.limiter.open[c.addr] == 0 {
			delete(c.limiter.open, c.addr)
		}
	})
	return c.Conn.Close()
}
