// Command loginserver is a small, complete password login server: a port of
// the "login endpoint" chapter of a FastAPI course. Users register with an
// email and a password (kept as a bcrypt hash), log in with the same pair,
// and get an OAuth2-style bearer token that opens /users/me.
//
// This file holds the program, the routes and the handlers, then the
// defenses around them. run builds the server; newServer names the routes,
// each with the wrappers around it; each handle* function reads the
// request, calls into auth.go, jwt.go or store.go, and answers.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/json/jsontext"
	"encoding/json/v2"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/netip"
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
	maxPerEmail := flags.Int("max-failures-per-email", 100, "failed logins for one email from all addresses in 15 minutes before only addresses that logged in as it may try it (0: no limit)")
	maxConns := flags.Int("max-connections-per-address", 64, "open connections allowed for one client address; more are closed at once (0: no limit)")
	maxAllConns := flags.Int("max-connections", defaultMaxConnections(), "open connections allowed in all, below the limit on open files; more are closed at once (0: no limit)")
	var web webConfig
	flags.Func("allow-origin", "an origin, such as http://localhost:5173, whose pages may call the API (CORS); may be repeated", func(origin string) error {
		if origin == "*" {
			return errors.New("* would let every page on the web log in as its visitors and lock them out: name each origin")
		}
		if err := http.NewCrossOriginProtection().AddTrustedOrigin(origin); err != nil {
			return err // not scheme://host[:port]
		}
		// An origin in another spelling would never match an Origin header,
		// and its pages would be refused without a word.
		if sent := browserOrigin(origin); sent != origin {
			return fmt.Errorf("a browser sends this origin as %s: give it so", sent)
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
	if min(*maxPerAccount, *maxPerAddress, *maxPerEmail, *maxConns, *maxAllConns) < 0 {
		return errors.New("-max-failures-per-account, -max-failures-per-address, -max-failures-per-email, -max-connections-per-address and -max-connections must be 0 (no limit) or more")
	}
	if limit, known := openFilesLimit(); known && *maxAllConns > limit-descriptorsKept {
		return fmt.Errorf("-max-connections must be at most %d: the limit on open files, %d, less %d the server keeps for itself",
			limit-descriptorsKept, limit, descriptorsKept)
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))

	secret, err := loadSecret(lookupEnv, logger)
	if err != nil {
		return err
	}
	// Loading many users and making the dummy hash take a while; a signal
	// meanwhile stops the program at once.
	var users *store
	var dummyHash string
	loaded := make(chan error, 1)
	go func() {
		var err error
		users, err = openStore(*usersPath, logger)
		if err == nil {
			dummyHash, err = hashPassword(rand.Text(), bcrypt.DefaultCost)
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
	cfg := config{
		secret:    secret,
		now:       time.Now,
		hashCost:  bcrypt.DefaultCost,
		dummyHash: dummyHash,
		limiter:   newLoginLimiter(*maxPerAccount, *maxPerAddress, *maxPerEmail, time.Now),
		cpus:      newCPUSlots(),
		changes:   newChangeSlots(),
		costliest: max(bcrypt.DefaultCost, users.costliestCost()),
		web:       web,
	}
	srv := newHTTPServer(newServer(logger, users, cfg), logger)
	logger.Info("listening", "addr", ln.Addr().String(), "users", *usersPath)
	return serve(ctx, srv, limitConnections(ln, *maxConns, *maxAllConns), logger)
}

// config is what newServer needs besides the log and the users.
type config struct {
	secret    []byte           // signs the tokens: JWT_SECRET
	now       func() time.Time // the clock tokens are issued and checked by
	hashCost  int              // bcrypt cost of new hashes: bcrypt.DefaultCost
	dummyHash string           // compared for an unknown email, at hashCost

	// The defenses' state.
	limiter   *loginLimiter // counts failed logins
	cpus      *slots        // one bcrypt run per CPU
	changes   *slots        // one change of the users file at a time
	costliest int           // the highest bcrypt cost, stored or new, at start
	web       webConfig     // other origins and host names trusted
}

// newServer returns the server's handler: the route table, each route's
// handler listed with the wrappers around it, outermost first, and then
// the wrappers around every route. Each wrapper is a defense, named for
// what it stops; deleting its line leaves the chapter's server.
func newServer(logger *slog.Logger, users *store, cfg config) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /register", with(handleRegister(logger, users, cfg.hashCost),
		refuseCrossSite(cfg.web),
		oneChangeAtATime(cfg.changes),
		waitForCPU(cfg.cpus),
	))
	mux.Handle("POST /login", with(handleLogin(users, cfg.dummyHash, cfg.secret, cfg.now),
		refuseCrossSite(cfg.web),
		throttleLogins(cfg.limiter),
		waitForCPU(cfg.cpus),
		equalFailureTime(users, cfg.dummyHash, cfg.costliest),
		rehashCheapHashes(logger, users, cfg.hashCost),
	))
	mux.Handle("GET /users/me", with(handleUsersMe(),
		requireUser(users, cfg.secret, cfg.now),
	))
	mux.Handle("POST /logout", with(handleLogout(logger, users),
		refuseCrossSite(cfg.web),
		requireUser(users, cfg.secret, cfg.now),
	))
	mux.Handle("PUT /users/me/password", with(handleChangePassword(logger, users, cfg.hashCost, cfg.secret, cfg.now),
		refuseCrossSite(cfg.web),
		requireUser(users, cfg.secret, cfg.now),
		throttleConfirmations(cfg.limiter),
		oneChangeAtATime(cfg.changes),
		waitForCPU(cfg.cpus),
	))
	mux.Handle("DELETE /users/me", with(handleDeleteAccount(logger, users),
		refuseCrossSite(cfg.web),
		requireUser(users, cfg.secret, cfg.now),
		throttleConfirmations(cfg.limiter),
		oneChangeAtATime(cfg.changes),
		waitForCPU(cfg.cpus),
	))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /openapi.json", handleFile("application/json", "", openAPIJSON))
	mux.Handle("GET /docs", handleFile("text/html; charset=utf-8", docsPolicy, docsPage))

	return with(mux,
		logRequests(logger),
		commonHeaders(cfg.web),
		checkHost(cfg.web),
		allowOrigins(cfg.web),
		routingErrorsInJSON,
	)
}

// with returns h inside the wrappers, the first outermost, as FastAPI
// declares middleware around a route: with(h, a, b) is a(b(h)).
func with(h http.Handler, wrappers ...func(http.Handler) http.Handler) http.Handler {
	for _, wrap := range slices.Backward(wrappers) {
		h = wrap(h)
	}
	return h
}

// handleRegister creates a user from {"email", "password"}: the rules,
// then hashPassword, then the store.
func handleRegister(logger *slog.Logger, users *store, hashCost int) http.Handler {
	type response struct {
		ID    int64  `json:"id"`
		Email string `json:"email"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		email, password, ok := readJSONCredentials(w, r)
		if !ok {
			return
		}
		email = normalizeEmail(email)
		if err := validateEmail(email); err != nil {
			writeError(w, http.StatusUnprocessableEntity, err.Error())
			return
		}
		if err := validatePassword(password, email); err != nil {
			writeError(w, http.StatusUnprocessableEntity, err.Error())
			return
		}
		// The store decides races; this check only spares a bcrypt run.
		if _, taken := users.lookup(email); taken {
			writeError(w, http.StatusConflict, "Email already registered")
			return
		}
		hash, err := hashPassword(password, hashCost)
		if err != nil {
			writeStoreError(w, logger, err)
			return
		}
		u, err := users.add(r.Context(), email, hash)
		if err != nil {
			writeStoreError(w, logger, err)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusCreated, response{ID: u.ID, Email: u.Email})
	})
}

// handleLogin exchanges an email and a password for an access token, read
// from the tutorial's JSON body or the OAuth2 password form (RFC 6749
// section 4.3) that OAuth2 clients and FastAPI's OAuth2PasswordRequestForm
// send.
func handleLogin(users *store, dummyHash string, secret []byte, now func() time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		email, password, ok := readCredentials(w, r)
		if !ok {
			return
		}
		u, err := authenticateUser(users, dummyHash, email, password)
		if err != nil {
			// The same answer for an unknown email and a wrong password.
			w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
			writeLoginError(w, r, http.StatusUnauthorized, "Invalid email or password", "invalid_grant")
			return
		}
		writeToken(w, createAccessToken(u.Email, u.Session, secret, now()))
	})
}

// writeToken answers an access token as OAuth2 does (RFC 6749 section
// 5.1): {"access_token", "token_type": "bearer", "expires_in"}, which no
// cache may keep.
func writeToken(w http.ResponseWriter, token string) {
	type response struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
		ExpiresIn   int64  `json:"expires_in"`
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, response{token, "bearer", int64(accessTokenLifetime / time.Second)})
}

// handleUsersMe answers the user the request's token was issued to.
func handleUsersMe() http.Handler {
	type response struct {
		ID    int64  `json:"id"`
		Email string `json:"email"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u := userOf(r)
		writeJSON(w, http.StatusOK, response{ID: u.ID, Email: u.Email})
	})
}

// handleLogout ends every session of the request's user: every token
// issued to the user until now is refused from now on, on every device. A
// stateless token cannot be ended alone, without a list of ended ones that
// every request would check; so a logout ends all of the user's tokens.
func handleLogout(logger *slog.Logger, users *store) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := users.endSessions(r.Context(), userOf(r).ID); err != nil {
			writeStoreError(w, logger, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// handleChangePassword replaces the request's user's password, given
// {"current_password", "new_password"}, and answers a fresh token: the
// caller stays logged in, and every token issued before, the one sent
// too, is refused. The new password follows the registration's rules and
// must differ from the current one; both are checked before bcrypt runs,
// so that a 422 never tells whether the current password was right.
func handleChangePassword(logger *slog.Logger, users *store, hashCost int, secret []byte, now func() time.Time) http.Handler {
	type request struct {
		CurrentPassword *string `json:"current_password"`
		NewPassword     *string `json:"new_password"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body request
		if !readJSON(w, r, &body) || !required(w, "current_password", body.CurrentPassword) || !required(w, "new_password", body.NewPassword) {
			return
		}
		u := userOf(r)
		if err := validatePassword(*body.NewPassword, u.Email); err != nil {
			writeError(w, http.StatusUnprocessableEntity, err.Error())
			return
		}
		if *body.NewPassword == *body.CurrentPassword {
			writeError(w, http.StatusUnprocessableEntity, "new_password must differ from current_password")
			return
		}
		// The token is valid, so the answer is a 400: a 401 would send the
		// client to log in again.
		if !verifyPassword(*body.CurrentPassword, u.PasswordHash) {
			writeError(w, http.StatusBadRequest, "Incorrect password")
			return
		}
		hash, err := hashPassword(*body.NewPassword, hashCost)
		if err == nil {
			u, err = users.setPassword(r.Context(), u.ID, u.Session, hash)
		}
		if err != nil {
			writeStoreError(w, logger, err)
			return
		}
		writeToken(w, createAccessToken(u.Email, u.Session, secret, now()))
	})
}

// handleDeleteAccount removes the request's user, given {"password"}: the
// user's tokens are refused from then on, and the email may register
// again, as a new account that no old token opens.
func handleDeleteAccount(logger *slog.Logger, users *store) http.Handler {
	type request struct {
		Password *string `json:"password"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body request
		if !readJSON(w, r, &body) || !required(w, "password", body.Password) {
			return
		}
		u := userOf(r)
		if !verifyPassword(*body.Password, u.PasswordHash) {
			writeError(w, http.StatusBadRequest, "Incorrect password")
			return
		}
		if err := users.remove(r.Context(), u.ID, u.Session); err != nil {
			writeStoreError(w, logger, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// requireUser returns a wrapper that does for a route what FastAPI's
// Depends(get_current_user) does: it runs the route's handler only for a
// request whose bearer token names a user, whom userOf then returns, and
// answers the two 401s itself. So a protected route's handler does its own
// work, and no more.
func requireUser(users *store, secret []byte, now func() time.Time) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			u, err := currentUser(r, users, secret, now())
			switch {
			case errors.Is(err, errNoToken):
				// No credentials sent: no error code (RFC 6750 section 3).
				w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
				writeError(w, http.StatusUnauthorized, "Not authenticated")
				return
			case err != nil:
				writeInvalidToken(w)
				return
			}
			w.Header().Set("Cache-Control", "no-store") // a user's data follows
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), userKey{}, u)))
		})
	}
}

// writeInvalidToken writes the 401 for a token that failed a check, or
// whose user or session is gone (RFC 6750 section 3.1).
func writeInvalidToken(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
	writeError(w, http.StatusUnauthorized, "Could not validate credentials")
}

// userKey is the context key under which requireUser keeps the request's user.
type userKey struct{}

// userOf returns the user whom requireUser found for r.
func userOf(r *http.Request) User {
	u, _ := r.Context().Value(userKey{}).(User)
	return u
}

// errNoToken is returned by currentUser for a request without a bearer token.
var errNoToken = errors.New("no bearer token")

// currentUser returns the user whose bearer token the request carries: the
// chapter's get_current_user, reading "Authorization: Bearer <token>" as
// OAuth2PasswordBearer does (the scheme in any letter case). It returns
// errNoToken if there is no such header, and an error wrapping
// errInvalidToken if the token fails a check, its user is gone, or its
// session has ended (a logout, a new password, an account made anew).
func currentUser(r *http.Request, users *store, secret []byte, now time.Time) (User, error) {
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return User{}, errNoToken
	}
	email, session, err := verifyAccessToken(strings.TrimLeft(token, " "), secret, now)
	if err != nil {
		return User{}, err
	}
	u, found := users.lookup(email)
	if !found {
		return User{}, fmt.Errorf("%w: user %q no longer exists", errInvalidToken, email)
	}
	if session != u.Session {
		return User{}, fmt.Errorf("%w: the session of user %d has ended", errInvalidToken, u.ID)
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

// readCredentials reads a login's email and password: the tutorial's JSON
// body, or the OAuth2 password form. If the body is neither, or is not
// valid, it writes the error and returns false.
func readCredentials(w http.ResponseWriter, r *http.Request) (email, password string, ok bool) {
	switch t := mediaType(r); {
	case t == "application/x-www-form-urlencoded":
		return readFormCredentials(w, r)
	case isJSON(t):
		return readJSONCredentials(w, r)
	}
	writeError(w, http.StatusUnsupportedMediaType,
		"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)")
	return "", "", false
}

// credentials is the tutorial's JSON body for /register and /login, its
// UserCreate model. Its fields are pointers, nil when a member is missing
// or null, so that a missing password can be told from an empty one.
type credentials struct {
	Email    *string `json:"email"`
	Password *string `json:"password"`
}

// readJSONCredentials reads {"email": "...", "password": "..."}, ignoring
// other members, as FastAPI does. If it cannot, it writes the error and
// returns false.
func readJSONCredentials(w http.ResponseWriter, r *http.Request) (email, password string, ok bool) {
	var body credentials
	if !readJSON(w, r, &body) || !required(w, "email", body.Email) || !required(w, "password", body.Password) {
		return "", "", false
	}
	return *body.Email, *body.Password, true
}

// required reports whether the member name of a JSON body was given, as v;
// if it was not, or was null, it writes the 422 and returns false.
func required(w http.ResponseWriter, name string, v *string) bool {
	if v == nil {
		writeError(w, http.StatusUnprocessableEntity, name+" is required")
	}
	return v != nil
}

// readFormCredentials reads an OAuth2 password grant form: username,
// password, and grant_type=password if any. If it cannot, it writes the
// error and returns false.
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
		writeLoginError(w, r, http.StatusUnprocessableEntity, "body is not a valid form", "invalid_request")
		return "", "", false
	}
	if grant, present := form["grant_type"]; present && (len(grant) != 1 || grant[0] != "password") {
		writeLoginError(w, r, http.StatusBadRequest, "unsupported grant_type", "unsupported_grant_type")
		return "", "", false
	}
	// As for JSON: not UTF-8, or a field given twice, is refused.
	for name, values := range form {
		if !utf8.ValidString(name) || slices.ContainsFunc(values, func(v string) bool { return !utf8.ValidString(v) }) {
			writeLoginError(w, r, http.StatusUnprocessableEntity, "body must be valid UTF-8", "invalid_request")
			return "", "", false
		}
	}
	for _, field := range []string{"username", "password"} {
		if len(form[field]) != 1 {
			writeLoginError(w, r, http.StatusUnprocessableEntity, field+" is required, once", "invalid_request")
			return "", "", false
		}
	}
	return form.Get("username"), form.Get("password"), true
}

// readJSON reads a JSON request body into the struct v points to. If the
// body is not sent as JSON (415), is too large (413) or is not one valid
// JSON object (422), it writes the error and returns false.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	if !isJSON(mediaType(r)) {
		writeError(w, http.StatusUnsupportedMediaType, "body must be JSON, sent with Content-Type: application/json")
		return false
	}
	body, ok := readBody(w, r)
	if !ok {
		return false
	}
	if err := decodeJSON(body, v); err != nil {
		writeError(w, http.StatusUnprocessableEntity, err.Error())
		return false
	}
	return true
}

// decodeJSON decodes data, one JSON object and nothing after it, into the
// struct v points to, whose fields are all strings. encoding/json/v2 reads
// strictly, so that no two readers of one body can disagree about it:
// member names match exactly ("EMAIL" or "paſſword" is an unknown member),
// a name given twice is refused rather than read last-wins, and text that
// is not UTF-8 is refused rather than mended. Its error is a sentence for
// the client, naming the member at fault.
func decodeJSON(data []byte, v any) error {
	if !utf8.Valid(data) {
		return errors.New("body must be valid UTF-8")
	}
	if !bytes.HasPrefix(bytes.TrimLeft(data, " \t\r\n"), []byte("{")) {
		return errors.New("body must be one JSON object")
	}
	err := json.Unmarshal(data, v)
	var syntax *jsontext.SyntacticError
	var semantic *json.SemanticError
	switch {
	case errors.Is(err, jsontext.ErrDuplicateName) && errors.As(err, &syntax):
		return fmt.Errorf("body names %q twice", syntax.JSONPointer.LastToken())
	case errors.As(err, &syntax) && syntax.JSONPointer != "":
		return fmt.Errorf("body is not one valid JSON object: it is malformed at byte %d, in %q", syntax.ByteOffset, syntax.JSONPointer.LastToken())
	case errors.As(err, &syntax):
		return fmt.Errorf("body is not one valid JSON object: it is malformed at byte %d", syntax.ByteOffset)
	case errors.As(err, &semantic):
		return fmt.Errorf("%s must be a string", semantic.JSONPointer.LastToken())
	case err != nil:
		return errors.New("body could not be read as JSON")
	}
	if n := numberOutOfRange(data); n != "" {
		return fmt.Errorf("body holds a number %s, out of range", n)
	}
	return nil
}

// numberOutOfRange returns the first number in valid JSON text that is too
// large for a float64, such as 1e999, or "" if there is none. Readers
// disagree about such a number (Python reads infinity, Go an error), even
// in a member the server ignores, so a body holding one is refused.
func numberOutOfRange(data []byte) string {
	dec := jsontext.NewDecoder(bytes.NewReader(data))
	for {
		tok, err := dec.ReadToken()
		if err != nil { // io.EOF: the text has been read to its end
			return ""
		}
		if tok.Kind() != '0' {
			continue
		}
		if _, err := tok.Float(); err != nil { // strconv.ErrRange
			return tok.String()
		}
	}
}

// maxBodyBytes caps every request body.
const maxBodyBytes = 64 << 10

// readBody reads a request body of at most maxBodyBytes. If it is larger,
// it writes the 413 and returns false.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := readAll(http.MaxBytesReader(w, r.Body, maxBodyBytes), r.ContentLength)
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

// readAll reads r to its end into a buffer sized from contentLength, the
// size a request declares (-1 if it does not), up to maxBodyBytes: a body
// of known size then costs one allocation of its size, where io.ReadAll's
// doublings would cost about twice more, for every body, hostile or not.
func readAll(r io.Reader, contentLength int64) ([]byte, error) {
	var buf bytes.Buffer
	if contentLength > 0 {
		buf.Grow(int(min(contentLength, maxBodyBytes+1)) + bytes.MinRead)
	}
	_, err := buf.ReadFrom(r)
	return buf.Bytes(), err
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

// writeJSON writes v as a JSON response: headers, then status, then body.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	// The status is sent; an error here is a client that went away.
	json.MarshalWrite(w, v)
	io.WriteString(w, "\n")
}

// writeError writes an error in FastAPI's shape: {"detail": "..."}.
func writeError(w http.ResponseWriter, status int, detail string) {
	writeJSON(w, status, struct {
		Detail string `json:"detail"`
	}{detail})
}

// writeLoginError writes a login's error in FastAPI's shape, and for a
// login sent as the OAuth2 password form with RFC 6749 section 5.2's
// members too, error (the code) and error_description, which OAuth2
// clients read: requests-oauthlib, golang.org/x/oauth2.
func writeLoginError(w http.ResponseWriter, r *http.Request, status int, detail, code string) {
	if mediaType(r) != "application/x-www-form-urlencoded" {
		writeError(w, status, detail)
		return
	}
	writeJSON(w, status, struct {
		Detail           string `json:"detail"`
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}{detail, code, detail})
}

// writeBusy writes the 503 of a request that could not get its turn, at a
// CPU or at the users file: nothing was done, so a retry can succeed.
func writeBusy(w http.ResponseWriter) {
	w.Header().Set("Retry-After", "1")
	writeError(w, http.StatusServiceUnavailable, "Server busy, try again later")
}

// writeStoreError answers an error from the store: a 409 for an email
// already registered, a 401 for a user deleted or a session ended
// meanwhile, a 503 for a write
// that did not get its turn, and otherwise a 500, whose reason the log
// says and the client must not hear.
func writeStoreError(w http.ResponseWriter, logger *slog.Logger, err error) {
	switch {
	case errors.Is(err, errEmailTaken):
		writeError(w, http.StatusConflict, "Email already registered")
	case errors.Is(err, errNoUser), errors.Is(err, errSessionEnded):
		writeInvalidToken(w)
	case errors.Is(err, errStoreBusy):
		writeBusy(w)
	default:
		logger.Error("request failed", "err", err)
		writeError(w, http.StatusInternalServerError, "Internal server error")
	}
}

// loadSecret returns the secret that signs tokens, from JWT_SECRET. If
// JWT_SECRET is not set, it returns a random secret for this process and
// logs a warning that tokens will not survive a restart. If it is set but
// shorter than 32 bytes, it returns an error.
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

// logRequests returns a wrapper that logs one line per request: method,
// path, status, duration, and the client as throttling counts it. Never a
// header or a body, which may hold a password or a token.
func logRequests(logger *slog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
			next.ServeHTTP(rec, r)
			logger.Info("request", "method", r.Method, "path", r.URL.Path,
				"status", rec.status, "duration", time.Since(start), "client", clientAddr(r.RemoteAddr))
		})
	}
}

// statusRecorder remembers the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (rec *statusRecorder) WriteHeader(status int) {
	rec.status = status
	rec.ResponseWriter.WriteHeader(status)
}

// routingErrorsInJSON answers in JSON, as FastAPI does, what the mux
// answers itself when no route matches: 404 for an unknown path, and 405,
// its Allow header kept, for a known path with another method.
func routingErrorsInJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(&routingErrorWriter{ResponseWriter: w, r: r}, r)
	})
}

// routingErrorWriter turns the mux's plain-text answer into {"detail": ...},
// with the same status and headers. The mux sets r.Pattern to the route it
// chose before it calls the route's handler; no route, no pattern.
type routingErrorWriter struct {
	http.ResponseWriter
	r        *http.Request
	replaced bool // the mux's own answer: its text is dropped
}

func (w *routingErrorWriter) WriteHeader(status int) {
	if w.r.Pattern != "" || status < 400 {
		w.ResponseWriter.WriteHeader(status)
		return
	}
	w.replaced = true
	writeError(w.ResponseWriter, status, http.StatusText(status))
}

func (w *routingErrorWriter) Write(p []byte) (int, error) {
	if w.replaced {
		return len(p), nil
	}
	return w.ResponseWriter.Write(p)
}

// The defenses begin here, in the order newServer lists them: each is a
// wrapper that it puts around routes by name, those of single routes
// first, then those around every route; then the limits on the server and
// its listener.

// webConfig says which pages of other origins, and which host names, the
// server trusts besides its own.
type webConfig struct {
	allowOrigins []string // exact origins whose pages may call the API, from -allow-origin
	allowHosts   []string // host names accepted besides loopback ones, from -allow-host
	checkHost    bool     // refuse other host names: listening on loopback, or -allow-host given
}

// refuseCrossSite returns a wrapper that answers 403, before anything else
// runs, to a request a browser marks as sent by a page of another site
// (Sec-Fetch-Site, or an Origin that is not the Host) and not trusted by
// -allow-origin. So a hostile page cannot make its visitors fail five
// logins and be locked out. Clients that are not browsers send neither
// header, and pass.
func refuseCrossSite(web webConfig) func(http.Handler) http.Handler {
	c := http.NewCrossOriginProtection()
	for _, origin := range web.allowOrigins {
		if err := c.AddTrustedOrigin(origin); err != nil {
			panic(err) // run's -allow-origin checked each with this same call
		}
	}
	c.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "Cross-origin request refused")
	}))
	return c.Handler
}

// throttleLogins returns a wrapper that stops password guessing at /login
// (RFC 6749 section 4.3.2): limiter counts the logins answered 401 for the
// email the body names, and refuses a client that failed too often.
func throttleLogins(limiter *loginLimiter) func(http.Handler) http.Handler {
	return throttle(limiter, loginEmail, http.StatusUnauthorized)
}

// throttleConfirmations returns a wrapper that counts the password
// confirmations of an account's own routes, answered 400 when wrong, as
// failed logins of the request's user: so a stolen token cannot be used to
// guess the password. It goes inside requireUser, which finds the user.
func throttleConfirmations(limiter *loginLimiter) func(http.Handler) http.Handler {
	return throttle(limiter, func(r *http.Request) (string, bool) { return userOf(r).Email, true }, http.StatusBadRequest)
}

// loginEmail returns the normalised email a login tries, read as
// handleLogin reads it, or false if handleLogin will refuse the body.
func loginEmail(r *http.Request) (string, bool) {
	email, _, ok := peekCredentials(r)
	return normalizeEmail(email), ok
}

// throttle returns a wrapper that counts failed password checks with
// limiter: emailOf says whose password a request tries (false: none, for a
// body the route will refuse), and an answer of status failed is a wrong
// password. A request from a client that failed too often is answered 429
// at once, whether its password is right or not, and runs no bcrypt.
//
// An attempt is counted as a failure before next runs, and taken back if
// next answers otherwise: so concurrent guesses cannot slip past the limit
// while bcrypt runs. A success clears the email's count for the client.
func throttle(limiter *loginLimiter, emailOf func(*http.Request) (string, bool), failed int) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			email, ok := emailOf(r)
			if !ok {
				next.ServeHTTP(w, r)
				return
			}
			client := clientAddr(r.RemoteAddr)
			if retryAfter := limiter.begin(client, email); retryAfter > 0 {
				w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter/time.Second)))
				writeError(w, http.StatusTooManyRequests, "Too many failed login attempts, try again later")
				return
			}
			rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
			next.ServeHTTP(rec, r)
			switch {
			case rec.status == failed: // counted already
			case rec.status < 300:
				limiter.succeeded(client, email)
			default: // the password was not checked: busy, or refused before
				limiter.cancel(client, email)
			}
		})
	}
}

// clientAddr returns the client that throttling and the connection caps
// count for a connection's remote address: its IPv4 address, or the /64
// network of its IPv6 address, since one host may hold a whole /64 and
// take a new address in it for every request. Proxy headers such as
// X-Forwarded-For are not trusted: any client can set them.
func clientAddr(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	ip = ip.Unmap().WithZone("") // ::ffff:192.0.2.1 is 192.0.2.1
	if ip.Is4() {
		return ip.String()
	}
	network, _ := ip.Prefix(64)
	return network.String()
}

// peekCredentials returns the email and password of a login request, read
// with handleLogin's own reader, readCredentials, answering nothing, and
// puts the body back for the handler. It returns false if readCredentials
// will refuse the body. The body is read and its credentials found once,
// however many wrappers ask.
func peekCredentials(r *http.Request) (email, password string, ok bool) {
	b := bufferBody(r)
	if b.peeked == nil {
		peek := r.Clone(r.Context())
		peek.Body, peek.ContentLength = io.NopCloser(bytes.NewReader(b.data)), int64(len(b.data))
		b.peeked = &peekedCredentials{}
		b.peeked.email, b.peeked.password, b.peeked.ok = readCredentials(newDiscardResponse(), peek)
	}
	return b.peeked.email, b.peeked.password, b.peeked.ok && b.err == nil
}

// peekedCredentials is what peekCredentials found in a body.
type peekedCredentials struct {
	email, password string
	ok              bool
}

// bufferedBody is a request body that bufferBody has read and put back,
// so that the handler reads it again from its start.
type bufferedBody struct {
	io.Reader
	data   []byte             // the body, or its first maxBodyBytes+1 bytes
	err    error              // the error reading it, if any
	peeked *peekedCredentials // nil until peekCredentials has looked
}

// Close does nothing: the server closes the body it gave the handler.
func (*bufferedBody) Close() error { return nil }

// bufferBody reads r's body, up to one byte more than maxBodyBytes, and
// puts it back, so that the handler reads it again and still finds it too
// large if it is. A body already buffered is not read again.
func bufferBody(r *http.Request) *bufferedBody {
	if b, ok := r.Body.(*bufferedBody); ok {
		return b
	}
	data, err := readAll(io.LimitReader(r.Body, maxBodyBytes+1), r.ContentLength)
	b := &bufferedBody{Reader: io.MultiReader(bytes.NewReader(data), r.Body), data: data, err: err}
	r.Body = b
	return b
}

// discardResponse is a ResponseWriter that keeps the status and headers it
// is given and drops the body: for running a handler, or a body reader,
// only to learn how it would answer.
type discardResponse struct {
	header http.Header
	status int
}

func newDiscardResponse() *discardResponse {
	return &discardResponse{header: http.Header{}, status: http.StatusOK}
}

func (d *discardResponse) Header() http.Header         { return d.header }
func (d *discardResponse) Write(p []byte) (int, error) { return len(p), nil }
func (d *discardResponse) WriteHeader(status int)      { d.status = status }

// waitForCPU returns a wrapper that runs next, whose work is bcrypt, in one
// of cpus's slots: at most one bcrypt run per CPU at once, the others
// waiting their turn. So a flood of logins is answered at the rate the CPUs
// can check passwords, instead of slowing every request down until all
// time out.
func waitForCPU(cpus *slots) func(http.Handler) http.Handler {
	return waitForSlot(cpus)
}

// oneChangeAtATime returns a wrapper that runs next, a route that changes
// the users file, in changes's one slot, before it waits for a CPU.
// Changes take turns at the file anyway; one waiting there for its turn
// while holding a CPU slot would keep logins from that CPU, so that a
// flood of registrations would stall logins.
func oneChangeAtATime(changes *slots) func(http.Handler) http.Handler {
	return waitForSlot(changes)
}

// waitForSlot returns a wrapper that runs next in one of s's slots. A
// request that waits s.maxWait in vain, or whose client leaves, is
// answered 503 at once. The body is read before the wait: a client slow to
// send it never holds a slot.
func waitForSlot(s *slots) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			bufferBody(r)
			if err := s.acquire(r.Context()); err != nil {
				writeBusy(w)
				return
			}
			defer s.release()
			next.ServeHTTP(w, r)
		})
	}
}

// equalFailureTime returns a wrapper that makes every failed login cost
// one comparison at the costliest cost there is, whatever the cost of the
// hash it was checked against: a users file may hold cheaper hashes (made
// elsewhere, or long ago), and a failure that answered sooner for them
// would tell that their emails exist. The extra comparisons (compareAgain)
// are real work in the CPU slot, so neither the answer's time nor that of
// a request queued behind it tells a cost. net/http sends the answer when
// the handler returns, so after them.
func equalFailureTime(users *store, dummyHash string, costliest int) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			email, password, ok := peekCredentials(r)
			rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
			next.ServeHTTP(rec, r)
			if !ok || rec.status != http.StatusUnauthorized {
				return
			}
			hash := dummyHash // what authenticateUser compared with
			if u, found := users.lookup(normalizeEmail(email)); found {
				hash = u.PasswordHash
			}
			compareAgain(password, hash, costliest)
		})
	}
}

// rehashCheapHashes returns a wrapper that, after a successful login whose
// stored hash is cheaper than cost, stores a new hash of the password at
// cost before the answer is sent, as passlib's verify_and_update does: an
// old, cheap hash then costs a thief of the users file as much as any
// other. If the new hash cannot be stored, the old one stays, and works.
func rehashCheapHashes(logger *slog.Logger, users *store, cost int) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			email, password, ok := peekCredentials(r)
			rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
			next.ServeHTTP(rec, r)
			if !ok || rec.status != http.StatusOK {
				return
			}
			u, found := users.lookup(normalizeEmail(email))
			if !found || hashCost(u.PasswordHash) >= cost {
				return
			}
			hash, err := hashPassword(password, cost)
			if err == nil {
				err = users.setHash(r.Context(), u.ID, u.PasswordHash, hash)
			}
			if err != nil {
				logger.Warn("password not rehashed at the server's cost; the old hash stays", "user", u.ID, "err", err)
			}
		})
	}
}

// commonHeaders returns a wrapper that sets the headers every response
// carries, the mux's own 404 and 405 and the host check's 400 included.
// Browsers must take a response for what its Content-Type says (nosniff),
// and no page of another site may frame one (clickjacking). With origins
// allowed, answers differ by Origin, and caches must not give one origin's
// answer to another (Vary).
func commonHeaders(web webConfig) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.Header().Set("X-Frame-Options", "DENY")
			if len(web.allowOrigins) > 0 {
				w.Header().Add("Vary", "Origin")
			}
			next.ServeHTTP(w, r)
		})
	}
}

// checkHost returns a wrapper that answers 400, before anything else runs,
// to a request whose Host is neither a loopback name (localhost,
// 127.x.x.x, [::1], any port) nor in web.allowHosts. It stops DNS
// rebinding: a page on the internet can point its own domain at 127.0.0.1,
// and its requests then reach this server as same-origin. A server
// listening elsewhere, with no -allow-host, takes any Host.
func checkHost(web webConfig) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
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
}

// allowOrigins returns a wrapper that lets pages of web.allowOrigins call
// the API (CORS): their preflight OPTIONS is answered with the methods the
// route takes, and every answer, errors included, lets the page read it,
// WWW-Authenticate and Retry-After too. No credentials mode: the token is a
// header, never a cookie. Other origins get no such header, so browsers
// hide the answers from their pages.
func allowOrigins(web webConfig) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if len(web.allowOrigins) == 0 {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			origin := r.Header.Get("Origin")
			if !slices.Contains(web.allowOrigins, origin) {
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Access-Control-Allow-Origin", origin)
			w.Header().Set("Access-Control-Expose-Headers", "WWW-Authenticate, Retry-After")
			if r.Method != http.MethodOptions {
				next.ServeHTTP(w, r)
				return
			}
			methods := routeMethods(next, r)
			if methods == "" { // a path no route serves: its 404
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Access-Control-Allow-Methods", methods)
			w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
			w.Header().Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
		})
	}
}

// routeMethods returns the methods that routes of next take at the path of
// r, an OPTIONS request, or "" if no route serves that path. No route
// takes OPTIONS, so the mux answers it with a 405 whose Allow header lists
// them; the route table stays the one place that says which they are.
func routeMethods(next http.Handler, r *http.Request) string {
	probe := newDiscardResponse()
	next.ServeHTTP(probe, r)
	if probe.status != http.StatusMethodNotAllowed {
		return ""
	}
	return probe.header.Get("Allow")
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

// limitConnections caps each client's open connections at perClient, and
// all clients' at total (0: no cap), closing one over a cap at once: one
// client cannot take the file descriptors and memory others need, and many
// together cannot take the server's last ones, which it needs to accept
// and to write the users file. The connections open are served.
func limitConnections(ln net.Listener, perClient, total int) net.Listener {
	if perClient == 0 && total == 0 {
		return ln
	}
	return &connLimiter{Listener: ln, perClient: perClient, total: total, open: make(map[string]int)}
}

// connLimiter is a listener that counts each client's connections, and all.
type connLimiter struct {
	net.Listener
	perClient, total int // 0: no cap

	mu      sync.Mutex     // guards open and openAll
	open    map[string]int // open connections by client
	openAll int
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := clientAddr(conn.RemoteAddr().String())
		l.mu.Lock()
		admitted := (l.perClient == 0 || l.open[addr] < l.perClient) && (l.total == 0 || l.openAll < l.total)
		if admitted {
			l.open[addr]++
			l.openAll++
		}
		l.mu.Unlock()
		if admitted {
			return &countedConn{Conn: conn, limiter: l, addr: addr}, nil
		}
		conn.Close()
	}
}

// countedConn gives its place back to the counts when closed.
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
		c.limiter.openAll--
		if c.limiter.open[c.addr]--; c.limiter.open[c.addr] == 0 {
			delete(c.limiter.open, c.addr)
		}
	})
	return c.Conn.Close()
}

// descriptorsKept is how many file descriptors the connection cap leaves
// for the server's own: the listener, the users file, its temporary file
// and its folder while a change is written, standard streams, the runtime's.
const descriptorsKept = 32

// defaultMaxConnections returns the cap on all open connections: the
// process's limit on open files, less descriptorsKept.
func defaultMaxConnections() int {
	limit, _ := openFilesLimit()
	return max(1, limit-descriptorsKept)
}

// openFilesLimit returns the process's limit on open files (RLIMIT_NOFILE,
// which Go raises to the hard limit at start), as Linux reports it in
// /proc/self/limits, and true; or 1024, a common limit, and false where
// that cannot be read. (Reading the file, rather than calling
// syscall.Getrlimit, keeps the program building on every system, Windows
// included.)
func openFilesLimit() (int, bool) {
	limits, _ := os.ReadFile("/proc/self/limits")
	for line := range strings.Lines(string(limits)) {
		// Max open files            20000                20000                files
		if fields := strings.Fields(line); strings.HasPrefix(line, "Max open files") && len(fields) == 6 {
			if n, err := strconv.Atoi(fields[3]); err == nil {
				return n, true
			}
		}
	}
	return 1024, false
}

// browserOrigin returns origin as a browser sends it in an Origin header:
// the scheme and host in lower case, and no port if it is the scheme's
// default one.
func browserOrigin(origin string) string {
	u, err := url.Parse(origin)
	if err != nil {
		return origin
	}
	scheme, host, port := strings.ToLower(u.Scheme), strings.ToLower(u.Hostname()), u.Port()
	if scheme == "http" && port == "80" || scheme == "https" && port == "443" {
		port = ""
	}
	if port == "" {
		if strings.Contains(host, ":") { // an IPv6 address
			host = "[" + host + "]"
		}
		return scheme + "://" + host
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}
