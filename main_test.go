// main_test.go tests the server through its real handlers, with a real
// store in a temporary folder. bcrypt runs at MinCost and the clock is a
// fakeClock, so the suite is fast and deterministic. The sections follow
// the code as a learner reads it:
//
//  1. Harness: test servers, requests, and the checks every section uses
//  2. The chapter: the story first (TestLoginChapter), then each function a
//     login and /users/me run, each route's handler, and the rules
//  3. Other routes: /healthz, /openapi.json, /docs
//  4. The defenses, one section each, in the order newServer applies them:
//     refuseCrossSite, throttleLogins, waitForCPU, equalFailureTime,
//     rehashCheapHashes, then around every route logRequests,
//     commonHeaders, checkHost, allowOrigins, routingErrorsInJSON, and the
//     listener's and server's limits
//  5. Store: the users file
//  6. Run: the program, its flags, its log and its lifecycle
//  7. Fuzz: arbitrary tokens and request bodies
//  8. Benchmarks

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/json/jsontext"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	gotoken "go/token"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"
)

// 1. Harness

const (
	testSecret   = "a-test-secret-of-at-least-32-bytes!"
	testEmail    = "ann@example.com"
	testPassword = "correct horse battery"
	testStart    = 1_800_000_000 // the fake clock's start, in Unix seconds
	testClient   = "192.0.2.1"   // the client address of a test request
)

// fakeClock is a clock that tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(testStart, 0)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// discardLog is a logger that writes nowhere.
var discardLog = slog.New(slog.DiscardHandler)

// noLimit turns a throttling limit off in a serverConfig.
const noLimit = -1

// serverConfig is what a test server may differ in. Its zero value is the
// usual one: a new users file in a temporary folder, bcrypt at MinCost,
// the default limits, no log.
type serverConfig struct {
	usersPath     string        // "" for a new file in a temporary folder
	cost          int           // bcrypt cost of new hashes; 0 for MinCost
	maxPerAccount int           // 0 for the default, 5; noLimit for none
	maxPerAddress int           // 0 for the default, 100; noLimit for none
	maxPerEmail   int           // 0 for the default, 100; noLimit for none
	cpus          int           // bcrypt runs at once; 0 for newCPUSlots's
	maxCPUWait    time.Duration // 0 for newCPUSlots's
	logger        *slog.Logger  // nil for no log
	web           webConfig     // the zero value: no other origin, any Host
}

// testServer is a server over a users file, with a clock the test moves.
type testServer struct {
	handler    http.Handler
	cfg        config // its limiter and CPU slots, for tests to look into
	users      *store
	clock      *fakeClock
	path       string          // the users file
	documented map[string]bool // "POST /login 401": what openapi.json documents
}

func newTestServer(tb testing.TB, sc serverConfig) *testServer {
	tb.Helper()
	limit := func(n, byDefault int) int {
		switch n {
		case 0:
			return byDefault
		case noLimit:
			return 0
		}
		return n
	}
	if sc.usersPath == "" {
		sc.usersPath = filepath.Join(tb.TempDir(), "users.json")
	}
	if sc.cost == 0 {
		sc.cost = bcrypt.MinCost
	}
	if sc.logger == nil {
		sc.logger = discardLog
	}
	cpus := newCPUSlots()
	if sc.cpus != 0 {
		cpus.held = make(chan struct{}, sc.cpus)
	}
	if sc.maxCPUWait != 0 {
		cpus.maxWait = sc.maxCPUWait
	}
	users, err := openStore(sc.usersPath, sc.logger)
	if err != nil {
		tb.Fatalf("openStore: %v", err)
	}
	dummyHash, err := hashPassword("the dummy's password", sc.cost)
	if err != nil {
		tb.Fatal(err)
	}
	clock := newFakeClock()
	cfg := config{
		secret:    []byte(testSecret),
		now:       clock.now,
		hashCost:  sc.cost,
		dummyHash: dummyHash,
		limiter: newLoginLimiter(limit(sc.maxPerAccount, 5), limit(sc.maxPerAddress, 100), limit(sc.maxPerEmail, 100),
			clock.now),
		cpus:      cpus,
		changes:   newChangeSlots(),
		costliest: max(sc.cost, users.costliestCost()),
		web:       sc.web,
	}
	return &testServer{
		handler:    newServer(sc.logger, users, cfg),
		cfg:        cfg,
		users:      users,
		clock:      clock,
		path:       sc.usersPath,
		documented: documentedStatuses(tb),
	}
}

// request describes a request to a test server. Only method and path are
// needed; the zero value of every other field means none, or the default.
type request struct {
	method, path string
	contentType  string
	body         string
	header       map[string]string
	client       string // the client's address; "" for testClient
	chunked      bool   // send no Content-Length: only reading finds the size
}

const formType = "application/x-www-form-urlencoded"

func postJSON(path, body string) request {
	return request{method: "POST", path: path, contentType: "application/json", body: body}
}

func postForm(path, body string) request {
	return request{method: "POST", path: path, contentType: formType, body: body}
}

// creds returns the JSON body {"email": email, "password": password}.
func creds(email, password string) string {
	b, _ := json.Marshal(map[string]string{"email": email, "password": password})
	return string(b)
}

// formCreds returns the OAuth2 password form for username and password.
func formCreds(username, password string) string {
	return url.Values{"grant_type": {"password"}, "username": {username}, "password": {password}}.Encode()
}

// withHeader returns req with the header name set to value.
func (req request) withHeader(name, value string) request {
	header := map[string]string{}
	maps.Copy(header, req.header)
	header[name] = value
	req.header = header
	return req
}

// from returns req sent from the client address addr.
func (req request) from(addr string) request { req.client = addr; return req }

// send sends req to h and returns the response and the request as h left
// it (the mux sets its Pattern).
func send(h http.Handler, req request) (*httptest.ResponseRecorder, *http.Request) {
	r := httptest.NewRequest(req.method, req.path, strings.NewReader(req.body))
	if req.chunked {
		r.ContentLength = -1
	}
	if req.client == "" {
		req.client = testClient
	}
	r.RemoteAddr = net.JoinHostPort(req.client, "40000")
	if req.contentType != "" {
		r.Header.Set("Content-Type", req.contentType)
	}
	for name, value := range req.header {
		r.Header.Set(name, value)
	}
	if host, ok := req.header["Host"]; ok { // the server reads r.Host, not a header
		r.Host = host
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w, r
}

// do sends req to the server and returns the response. Every status a
// route answers in a test must be in openapi.json.
func (ts *testServer) do(tb testing.TB, req request) *httptest.ResponseRecorder {
	tb.Helper()
	w, r := send(ts.handler, req)
	if r.Pattern != "" && !ts.documented[fmt.Sprint(r.Pattern, " ", w.Code)] {
		method, path, _ := strings.Cut(r.Pattern, " ")
		tb.Errorf("%s answered %d, which openapi.json does not document: "+
			"add a response \"%d\" under \"paths\" > %q > %q > \"responses\" in openapi.json",
			r.Pattern, w.Code, w.Code, path, strings.ToLower(method))
	}
	return w
}

func (ts *testServer) register(tb testing.TB, email, password string) *httptest.ResponseRecorder {
	tb.Helper()
	return ts.do(tb, postJSON("/register", creds(email, password)))
}

func (ts *testServer) login(tb testing.TB, email, password string) *httptest.ResponseRecorder {
	tb.Helper()
	return ts.loginFrom(tb, testClient, email, password)
}

// loginFrom logs in with JSON from a client address.
func (ts *testServer) loginFrom(tb testing.TB, client, email, password string) *httptest.ResponseRecorder {
	tb.Helper()
	return ts.do(tb, postJSON("/login", creds(email, password)).from(client))
}

// bearer returns req with the token in its Authorization header.
func bearer(req request, token string) request {
	return req.withHeader("Authorization", "Bearer "+token)
}

func (ts *testServer) me(tb testing.TB, token string) *httptest.ResponseRecorder {
	tb.Helper()
	return ts.do(tb, bearer(request{method: "GET", path: "/users/me"}, token))
}

// tokenFor logs email in with password and returns the access token.
func (ts *testServer) tokenFor(t *testing.T, email, password string) string {
	t.Helper()
	w := ts.login(t, email, password)
	if w.Code != http.StatusOK {
		t.Fatalf("login %s: status %d, body %s", email, w.Code, w.Body)
	}
	return decode(t, w.Body.Bytes())["access_token"].(string)
}

// token registers testEmail, logs in, and returns the access token.
func (ts *testServer) token(t *testing.T) string {
	t.Helper()
	if w := ts.register(t, testEmail, testPassword); w.Code != http.StatusCreated {
		t.Fatalf("register: status %d, body %s", w.Code, w.Body)
	}
	return ts.tokenFor(t, testEmail, testPassword)
}

// decode decodes a JSON object.
func decode(tb testing.TB, body []byte) map[string]any {
	tb.Helper()
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		tb.Fatalf("body %q is not a JSON object: %v", body, err)
	}
	return m
}

// checkJSON checks a response's status, that it is JSON with nosniff, and
// that its body has every member of want.
func checkJSON(t *testing.T, w *httptest.ResponseRecorder, status int, want map[string]any) map[string]any {
	t.Helper()
	if w.Code != status {
		t.Errorf("status = %d, want %d (body %s)", w.Code, status, w.Body)
	}
	if got := w.Header().Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", got)
	}
	got := decode(t, w.Body.Bytes())
	for k, v := range want {
		if fmt.Sprint(got[k]) != fmt.Sprint(v) {
			t.Errorf("body[%q] = %v, want %v (body %s)", k, got[k], v, w.Body)
		}
	}
	return got
}

// checkDetail checks an error response: its status, and a detail that is
// the only member and contains every one of words.
func checkDetail(t *testing.T, w *httptest.ResponseRecorder, status int, words ...string) {
	t.Helper()
	body := checkJSON(t, w, status, nil)
	detail, ok := body["detail"].(string)
	if !ok || detail == "" {
		t.Fatalf("detail = %v, want a sentence", body["detail"])
	}
	if len(body) != 1 {
		t.Errorf("error body = %s, want only detail", w.Body)
	}
	for _, word := range words {
		if !strings.Contains(detail, word) {
			t.Errorf("detail = %q, want it to mention %q", detail, word)
		}
	}
}

// checkHeaders checks name, value pairs of response headers: each header
// present once, with exactly that value.
func checkHeaders(t *testing.T, w *httptest.ResponseRecorder, pairs ...string) {
	t.Helper()
	for i := 0; i+1 < len(pairs); i += 2 {
		if got := w.Header().Values(pairs[i]); len(got) != 1 || got[0] != pairs[i+1] {
			t.Errorf("%s = %q, want exactly %q", pairs[i], got, pairs[i+1])
		}
	}
}

// writeUsers writes a users file of the given users, with next_id after
// the last, and returns its path.
func writeUsers(tb testing.TB, users ...User) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "users.json")
	f := storeFile{NextID: int64(len(users)) + 1, Users: users}
	if err := os.WriteFile(path, storeFileBytes(f), 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}

// mustHash returns a bcrypt hash of password at cost.
func mustHash(tb testing.TB, password string, cost int) string {
	tb.Helper()
	hash, err := hashPassword(password, cost)
	if err != nil {
		tb.Fatal(err)
	}
	return hash
}

// fastest returns the shortest of 3 runs of f: timing tests compare two
// such times, at a cost where bcrypt takes milliseconds, so that a slow or
// busy machine slows both alike.
func fastest(f func()) time.Duration {
	best := time.Hour
	for range 3 {
		start := time.Now()
		f()
		best = min(best, time.Since(start))
	}
	return best
}

// withCost returns hash with its cost digits changed: a hash of that cost
// to every reader, which only a comparison would find wrong.
func withCost(hash string, cost int) string {
	return hash[:4] + fmt.Sprintf("%02d", cost) + hash[6:]
}

// 2. The chapter

// TestLoginChapter is the chapter's story, end to end: register, log in,
// and open /users/me with the token; a wrong password and an unknown email
// get the same 401, word for word.
func TestLoginChapter(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, map[string]any{"id": 1, "email": testEmail})

	login := checkJSON(t, ts.login(t, testEmail, testPassword), 200, map[string]any{"token_type": "bearer",
		"expires_in": 1800})
	token, _ := login["access_token"].(string)
	checkJSON(t, ts.me(t, token), 200, map[string]any{"id": 1, "email": testEmail})

	wrong := ts.login(t, testEmail, "not the password at all")
	unknown := ts.login(t, "nobody@example.com", testPassword)
	checkJSON(t, wrong, 401, map[string]any{"detail": "Invalid email or password"})
	if wrong.Body.String() != unknown.Body.String() || fmt.Sprint(wrong.Header()) != fmt.Sprint(unknown.Header()) {
		t.Errorf("wrong password = %v %s; unknown email = %v %s; want the same", wrong.Header(), wrong.Body,
			unknown.Header(), unknown.Body)
	}
}

// TestAuthenticateUser: the user for the right email and password, in any
// letter case of the email; errInvalidCredentials for everything else,
// whatever the password looks like: no registration rule applies.
func TestAuthenticateUser(t *testing.T) {
	long72 := strings.Repeat("q", 72)
	users, _ := openStore(writeUsers(t,
		User{ID: 1, Email: testEmail, PasswordHash: mustHash(t, testPassword, bcrypt.MinCost)},
		User{ID: 2, Email: "old@example.com", PasswordHash: mustHash(t, "12345678", bcrypt.MinCost)}, // older rules
		User{ID: 3, Email: "long@example.com", PasswordHash: mustHash(t, long72, bcrypt.MinCost)},
	), discardLog)
	dummy := mustHash(t, "the dummy's password", bcrypt.MinCost)
	tests := []struct {
		email, password string
		wantID          int64 // 0 for errInvalidCredentials
	}{
		{testEmail, testPassword, 1},
		{" ANN@Example.com ", testPassword, 1},
		{"old@example.com", "12345678", 2},
		{"long@example.com", long72, 3},
		{"long@example.com", long72 + "x", 0}, // its first 72 bytes match
		{"nobody@example.com", testPassword, 0},
		{testEmail, "wrong password", 0},
		{testEmail, strings.ToUpper(testPassword), 0},
		{testEmail, "", 0},
		{"", testPassword, 0},
		{"not an email", testPassword, 0},
	}
	for _, tt := range tests {
		u, err := authenticateUser(users, dummy, tt.email, tt.password)
		if tt.wantID == 0 && !errors.Is(err, errInvalidCredentials) || tt.wantID != 0 && (err != nil || u.ID != tt.wantID) {
			t.Errorf("authenticateUser(%q, %q) = %+v, %v; want user %d", tt.email, tt.password, u, err, tt.wantID)
		}
	}
}

// TestAuthenticateUserUnknownEmail: for an unknown email, authenticateUser
// takes as long as for a wrong password: it runs bcrypt on the dummy hash.
// The two are compared with each other, at a cost where bcrypt takes some
// milliseconds, so a slow machine slows both alike.
func TestAuthenticateUserUnknownEmail(t *testing.T) {
	const cost = bcrypt.MinCost + 3
	users, _ := openStore(writeUsers(t, User{ID: 1, Email: testEmail, PasswordHash: mustHash(t, testPassword, cost)}),
		discardLog)
	dummy := mustHash(t, "the dummy's password", cost)
	unknown := fastest(func() { authenticateUser(users, dummy, "nobody@example.com", "a wrong password") })
	if wrong := fastest(func() { authenticateUser(users, dummy, testEmail, "a wrong password") }); unknown < wrong/2 {
		t.Errorf("unknown email took %v, wrong password %v: the unknown email skipped bcrypt", unknown, wrong)
	}
}

// TestHashPassword: a bcrypt hash at the cost asked for, never the
// password, different each time (a new salt), and no hash of a password
// over 72 bytes, which bcrypt would cut.
func TestHashPassword(t *testing.T) {
	first, second := mustHash(t, testPassword, bcrypt.MinCost+1), mustHash(t, testPassword, bcrypt.MinCost+1)
	if cost, err := bcrypt.Cost([]byte(first)); err != nil || cost != bcrypt.MinCost+1 {
		t.Errorf("cost = %d, %v; want %d", cost, err, bcrypt.MinCost+1)
	}
	if first == second || strings.Contains(first, testPassword) {
		t.Errorf("hashes %q and %q: want two different salts, no password", first, second)
	}
	if _, err := hashPassword(strings.Repeat("p", 73), bcrypt.MinCost); err == nil {
		t.Error("hashPassword(73 bytes) succeeded, want an error")
	}
}

func TestVerifyPassword(t *testing.T) {
	pw72 := strings.Repeat("z", 72)
	hash := mustHash(t, pw72, bcrypt.MinCost)
	tests := []struct {
		password string
		want     bool
	}{
		{pw72, true},
		{pw72 + "z", false}, // bcrypt alone would say yes: it reads 72 bytes
		{pw72[:71], false},
		{"", false},
	}
	for _, tt := range tests {
		if got := verifyPassword(tt.password, hash); got != tt.want {
			t.Errorf("verifyPassword(%d bytes) = %v, want %v", len(tt.password), got, tt.want)
		}
	}
	if verifyPassword(pw72, "not a hash") {
		t.Error("verifyPassword(a string that is not a hash) = true")
	}
}

func TestCreateAccessToken(t *testing.T) {
	now := time.Unix(testStart, 0)
	token := createAccessToken(testEmail, "the-session", []byte(testSecret), now)
	segs := strings.Split(token, ".")
	if len(segs) != 3 {
		t.Fatalf("token has %d segments, want 3", len(segs))
	}
	header, _ := b64.DecodeString(segs[0])
	if got := string(header); got != `{"alg":"HS256","typ":"JWT"}` {
		t.Errorf("header = %s", got)
	}
	claims, _ := b64.DecodeString(segs[1])
	want := fmt.Sprintf(`{"sub":"ann@example.com","iat":%d,"exp":%d,"sid":"the-session"}`, testStart, testStart+1800)
	if got := string(claims); got != want {
		t.Errorf("claims = %s, want %s", got, want)
	}
	if want := signRaw(segs[0]+"."+segs[1], []byte(testSecret)); token != want {
		t.Errorf("token = %s, want it signed with HMAC-SHA256 under the secret: %s", token, want)
	}
	if sub, sid, err := verifyAccessToken(token, []byte(testSecret), now.Add(29*time.Minute)); err != nil ||
		sub != testEmail || sid != "the-session" {
		t.Errorf("verify at 29 min = %q, %q, %v; want %q, the-session, nil", sub, sid, err, testEmail)
	}
	if _, _, err := verifyAccessToken(token, []byte(testSecret), now.Add(31*time.Minute)); !errors.Is(err,
		errInvalidToken) {
		t.Errorf("verify at 31 min = %v, want errInvalidToken", err)
	}
}

// forge builds a token from raw header and claims JSON, signed with
// HMAC-SHA256 under key over the segments as encoded. It is written apart
// from jwt.go's sign, so that a mistake there does not hide here.
func forge(header, claims string, key []byte) string {
	return signRaw(b64.EncodeToString([]byte(header))+"."+b64.EncodeToString([]byte(claims)), key)
}

// signRaw appends to a signing input, as it stands, its HMAC-SHA256 under key.
func signRaw(input string, key []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(input))
	return input + "." + b64.EncodeToString(mac.Sum(nil))
}

// alphabet is base64url's, in value order.
const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// padTo returns a valid token of exactly n bytes, padded by an extra claim.
func padTo(t *testing.T, n int, key []byte) string {
	t.Helper()
	for pad := max(0, n*3/4-200); pad < n; pad++ { // a segment is 4/3 of its bytes
		claims := fmt.Sprintf(`{"sub":"a","exp":%d,"pad":"%s"}`, testStart+1800, strings.Repeat("x", pad))
		if token := forge(jwtHeader, claims, key); len(token) == n {
			return token
		}
	}
	t.Fatalf("no token of %d bytes", n)
	return ""
}

// TestVerifyAccessToken holds the token's checks, one forged token for each.
func TestVerifyAccessToken(t *testing.T) {
	key := []byte(testSecret)
	const hdr = `{"alg":"HS256","typ":"JWT"}`
	claims := func(extra string) string {
		return fmt.Sprintf(`{"sub":"ann@example.com","iat":%d,"exp":%d%s}`, testStart, testStart+1800, extra)
	}
	exp := func(exp string) string { return forge(hdr, `{"sub":"a","exp":`+exp+`}`, key) }
	sub := func(sub string) string { return forge(hdr, fmt.Sprintf(`{%s"exp":%d}`, sub, testStart+1800), key) }
	good := forge(hdr, claims(""), key)
	segs := strings.Split(good, ".")
	// The signature's last character carries 2 unused bits; setting one
	// spells the same bytes differently, which strict decoding refuses.
	last := segs[2][len(segs[2])-1]
	otherSpelling := segs[2][:len(segs[2])-1] + string(alphabet[strings.IndexByte(alphabet, last)|1])
	tests := []struct {
		name  string
		token string
		ok    bool
	}{
		{"valid", good, true},
		{"valid, typ absent", forge(`{"alg":"HS256"}`, claims(""), key), true},
		{"valid, header spaced and reordered, signed as received", forge(`{ "typ" : "JWT", "alg" : "HS256" }`, claims(""),
			key), true},
		{"valid, claims as a library orders them", forge(hdr, fmt.Sprintf(`{"exp":%d,"iat":%d,"sub":"ann@example.com"}`,
			testStart+1800, testStart), key), true},
		{"valid, extra claims", forge(hdr, claims(`,"iss":"x","aud":["y"],"jti":"z"`), key), true},
		{"valid, exp one second ahead", exp(fmt.Sprint(testStart + 1)), true},
		{"valid, exp fractional", exp(fmt.Sprint(testStart) + ".5"), true},
		{"valid, nbf now", forge(hdr, claims(fmt.Sprintf(`,"nbf":%d`, testStart)), key), true},
		{"valid, nbf past", forge(hdr, claims(`,"nbf":1`), key), true},
		{"valid, 8 KiB exactly", padTo(t, 8<<10, key), true},

		{"longer than 8 KiB", padTo(t, 8<<10+1, key), false},
		{"empty", "", false},
		{"two segments", segs[0] + "." + segs[1], false},
		{"four segments", good + ".", false},
		{"four segments with data", good + "." + segs[2], false},
		{"padding", segs[0] + "." + segs[1] + "=." + segs[2], false},
		{"standard base64 characters", strings.NewReplacer("-", "+", "_", "/").Replace(good) + "+/", false},
		{"CR LF inside a segment", signRaw(segs[0][:4]+"\r\n"+segs[0][4:]+"."+segs[1], key), false},
		{"space inside a segment", segs[0] + " ." + segs[1] + "." + segs[2], false},
		{"non-zero trailing bits", segs[0] + "." + segs[1] + "." + otherSpelling, false},
		{"header not JSON", forge(`alg=HS256`, claims(""), key), false},
		{"header an array", forge(`["HS256"]`, claims(""), key), false},
		{"header null", forge(`null`, claims(""), key), false},
		{"header with trailing data", forge(hdr+`{}`, claims(""), key), false},
		{"alg none", forge(`{"alg":"none","typ":"JWT"}`, claims(""), key), false},
		{"alg none, no signature", b64.EncodeToString([]byte(`{"alg":"none"}`)) + "." + segs[1] + ".", false},
		{"alg hs256", forge(`{"alg":"hs256","typ":"JWT"}`, claims(""), key), false},
		{"alg HS512", forge(`{"alg":"HS512","typ":"JWT"}`, claims(""), key), false},
		{"alg RS256", forge(`{"alg":"RS256","typ":"JWT"}`, claims(""), key), false},
		{"alg missing", forge(`{"typ":"JWT"}`, claims(""), key), false},
		{"alg a number", forge(`{"alg":256}`, claims(""), key), false},
		{"alg null", forge(`{"alg":null}`, claims(""), key), false},
		{"alg in another key case", forge(`{"ALG":"HS256"}`, claims(""), key), false},
		{"alg named twice, the last HS256", forge(`{"alg":"none","alg":"HS256"}`, claims(""), key), false},
		{"alg named twice, both HS256", forge(`{"alg":"HS256","alg":"HS256"}`, claims(""), key), false},
		{"typ named twice", forge(`{"alg":"HS256","typ":"JWT","typ":"JWT"}`, claims(""), key), false},
		{"header not UTF-8", forge("{\"alg\":\"HS256\",\"x\":\"\xff\"}", claims(""), key), false},
		{"alg an array", forge(`{"alg":["HS256"]}`, claims(""), key), false},
		{"typ not JWT", forge(`{"alg":"HS256","typ":"JWS"}`, claims(""), key), false},
		{"typ null", forge(`{"alg":"HS256","typ":null}`, claims(""), key), false},
		{"crit present", forge(`{"alg":"HS256","typ":"JWT","crit":["exp"]}`, claims(""), key), false},
		{"crit empty", forge(`{"alg":"HS256","crit":[]}`, claims(""), key), false},
		{"crit null", forge(`{"alg":"HS256","crit":null}`, claims(""), key), false},
		{"signed with another key", forge(hdr, claims(""), []byte("another-secret-of-at-least-32-bytes")), false},
		{"signature empty", segs[0] + "." + segs[1] + ".", false},
		{"signature of re-encoded JSON",
			b64.EncodeToString([]byte(`{"typ":"JWT","alg":"HS256"}`)) + "." + segs[1] + "." + segs[2], false},
		{"claims changed after signing", segs[0] + "." + b64.EncodeToString([]byte(claims(`,"admin":true`))) + "." + segs[2],
			false},
		{"claims not JSON", forge(hdr, `sub=ann`, key), false},
		{"claims an array", forge(hdr, `[]`, key), false},
		{"claims null", forge(hdr, `null`, key), false},
		{"exp missing", forge(hdr, `{"sub":"ann@example.com"}`, key), false},
		{"exp a string", exp(fmt.Sprintf(`"%d"`, testStart+1800)), false},
		{"exp null", exp(`null`), false},
		{"exp true", exp(`true`), false},
		{"exp equal to now", exp(fmt.Sprint(testStart)), false},
		{"exp past", exp(fmt.Sprint(testStart - 1)), false},
		{"exp 0", exp(`0`), false},
		{"exp out of range", exp(`1e999`), false},
		{"exp in another key case", forge(hdr, fmt.Sprintf(`{"sub":"a","EXP":%d}`, testStart+1800), key), false},
		{"exp named twice", exp(fmt.Sprintf(`%d,"exp":%d`, testStart-1, testStart+1800)), false},
		{"sub named twice", sub(`"sub":"ann@example.com","sub":"bob@example.com",`), false},
		{"sub named twice, once escaped", sub(`"sub":"a","s\u0075b":"b",`), false},
		{"claims not UTF-8", sub("\"sub\":\"\xffa\","), false},
		{"nbf a second ahead", forge(hdr, claims(fmt.Sprintf(`,"nbf":%d`, testStart+1)), key), false},
		{"nbf a string", forge(hdr, claims(`,"nbf":"1"`), key), false},
		{"nbf null", forge(hdr, claims(`,"nbf":null`), key), false},
		{"sub missing", sub(``), false},
		{"sub empty", sub(`"sub":"",`), false},
		{"sub a number", sub(`"sub":1,`), false},
		{"sub null", sub(`"sub":null,`), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sub, _, err := verifyAccessToken(tt.token, key, time.Unix(testStart, 0))
			if tt.ok && err != nil {
				t.Errorf("verifyAccessToken = %v, want it accepted", err)
			}
			if !tt.ok && (err == nil || !errors.Is(err, errInvalidToken)) {
				t.Errorf("verifyAccessToken = %q, %v; want errInvalidToken", sub, err)
			}
		})
	}
}

// TestVerifyAccessTokenFractional: exp and nbf may have fractions of a
// second, and are compared with the clock to the nanosecond.
func TestVerifyAccessTokenFractional(t *testing.T) {
	key := []byte(testSecret)
	now := time.Unix(testStart, 600_000_000) // 0.6 s past testStart
	tests := []struct {
		claims string
		ok     bool
	}{
		{`{"sub":"a","exp":1800000000.5}`, false}, // expired 0.1 s ago
		{`{"sub":"a","exp":1800000000.7}`, true},
		{`{"sub":"a","exp":1800000900,"nbf":1800000000.7}`, false}, // valid in 0.1 s
		{`{"sub":"a","exp":1800000900,"nbf":1800000000.5}`, true},
	}
	for _, tt := range tests {
		if _, _, err := verifyAccessToken(forge(jwtHeader, tt.claims, key), key, now); (err == nil) != tt.ok {
			t.Errorf("claims %s at %s: err = %v, want accepted = %v", tt.claims, now.Format("15:04:05.000"), err, tt.ok)
		}
	}
}

// rfc7515Token is the HS256 example of RFC 7515 Appendix A.1.
const rfc7515Token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9" +
	".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ" +
	".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"

// TestVerifyAccessTokenRFC7515 checks the HS256 example of RFC 7515
// Appendix A.1: its signature is good under the appendix's key, and it is
// still refused, because its exp (2011) is past and it has no sub.
func TestVerifyAccessTokenRFC7515(t *testing.T) {
	const token = rfc7515Token
	key, err := base64.RawURLEncoding.DecodeString("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4h" +
		"cgUuTwjAzZr1Z9CAow")
	if err != nil {
		t.Fatal(err)
	}
	i := strings.LastIndexByte(token, '.')
	if got, want := b64.EncodeToString(sign(token[:i], key)), token[i+1:]; got != want {
		t.Fatalf("signature = %s, want the RFC's %s", got, want)
	}
	_, _, err = verifyAccessToken(token, key, time.Unix(testStart, 0))
	if !errors.Is(err, errInvalidToken) || !strings.Contains(err.Error(), "expired") {
		t.Errorf("verify now = %v, want refused as expired", err)
	}
	_, _, err = verifyAccessToken(token, key, time.Unix(1300819379, 0)) // a second before its exp
	if !errors.Is(err, errInvalidToken) || !strings.Contains(err.Error(), "sub") {
		t.Errorf("verify before exp = %v, want refused for want of sub", err)
	}
}

// TestVerifyAccessTokenConstantTime reads jwt.go's source: the one test
// that reads code, because no answer shows a timing leak reliably. A
// comparison that stops at the first differing byte tells a forger, by its
// time, how much of a signature is right; hmac.Equal takes the same time
// whatever the bytes. verifyAccessToken must call it, and the program must
// compare bytes no other way.
func TestVerifyAccessTokenConstantTime(t *testing.T) {
	calls := map[string]bool{}
	for _, name := range []string{"main.go", "auth.go", "jwt.go", "store.go"} {
		file, err := parser.ParseFile(gotoken.NewFileSet(), name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			if fn, ok := n.(*ast.FuncDecl); ok && fn.Name.Name == "verifyAccessToken" {
				ast.Inspect(fn, func(n ast.Node) bool {
					if call, ok := n.(*ast.CallExpr); ok && fmt.Sprint(call.Fun) == "&{hmac Equal}" {
						calls["hmac.Equal in verifyAccessToken"] = true
					}
					return true
				})
			}
			if sel, ok := n.(*ast.SelectorExpr); ok && fmt.Sprint(sel.X) == "bytes" && (sel.Sel.Name == "Equal" ||
				sel.Sel.Name == "Compare") {
				calls["bytes."+sel.Sel.Name] = true
			}
			return true
		})
	}
	if !calls["hmac.Equal in verifyAccessToken"] {
		t.Error("verifyAccessToken does not compare the signature with hmac.Equal")
	}
	for _, call := range []string{"bytes.Equal", "bytes.Compare"} {
		if calls[call] {
			t.Errorf("the program calls %s, which does not take constant time; compare secrets with hmac.Equal", call)
		}
	}
}

// TestCurrentUser: the user of a valid bearer token, the scheme in any
// letter case; errNoToken without credentials; errInvalidToken for a token
// that fails a check or whose user is gone.
func TestCurrentUser(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	now := ts.clock.now()
	ann, _ := ts.users.lookup(testEmail)
	tests := []struct {
		authorization string // "" for no header
		want          error  // nil for the user
	}{
		{"Bearer " + token, nil},
		{"bearer " + token, nil},
		{"BEARER  " + token, nil},
		{"", errNoToken},
		{"Basic YW5uOnB3", errNoToken},
		{token, errNoToken},
		{"Bearer", errInvalidToken},
		{"Bearer ", errInvalidToken},
		{"Bearer abc", errInvalidToken},
		{"Bearer " + token[:len(token)-2] + "AA", errInvalidToken},
		{"Bearer " + createAccessToken(testEmail, ann.Session, []byte("another-secret-of-at-least-32-bytes"), now),
			errInvalidToken},
		{"Bearer " + createAccessToken("ghost@example.com", ann.Session, []byte(testSecret), now), errInvalidToken},
		{"Bearer " + createAccessToken(testEmail, "an ended session", []byte(testSecret), now), errInvalidToken},
		{"Bearer " + createAccessToken(testEmail, "", []byte(testSecret), now), errInvalidToken},
	}
	for _, tt := range tests {
		r := httptest.NewRequest("GET", "/", nil)
		if tt.authorization != "" {
			r.Header.Set("Authorization", tt.authorization)
		}
		u, err := currentUser(r, ts.users, []byte(testSecret), now)
		if tt.want == nil && (err != nil || u.Email != testEmail) || tt.want != nil && !errors.Is(err, tt.want) {
			t.Errorf("Authorization %q: %+v, %v; want %v", tt.authorization, u, err, tt.want)
		}
	}
}

// TestRequireUser puts requireUser around a handler of its own, as a new
// protected route would be: the handler runs only with a valid token and
// gets its user, whose answer is never cached; requireUser writes both 401s.
func TestRequireUser(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	var got []User
	h := with(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, userOf(r))
		writeJSON(w, http.StatusOK, map[string]string{"hello": userOf(r).Email})
	}), requireUser(ts.users, []byte(testSecret), ts.clock.now))
	greeting := request{method: "GET", path: "/greeting"}

	w, _ := send(h, bearer(greeting, token))
	checkHeaders(t, w, "Cache-Control", "no-store")
	if w.Code != 200 || len(got) != 1 || got[0].Email != testEmail || got[0].ID != 1 {
		t.Errorf("valid token: %d, handler got %+v; want 200 and the user", w.Code, got)
	}
	w, _ = send(h, greeting)
	checkDetail(t, w, 401, "Not authenticated")
	checkHeaders(t, w, "WWW-Authenticate", `Bearer realm="api"`)
	w, _ = send(h, greeting.withHeader("Authorization", ""))
	checkDetail(t, w, 401, "Not authenticated")
	w, _ = send(h, bearer(greeting, token+"x"))
	checkDetail(t, w, 401, "Could not validate credentials")
	checkHeaders(t, w, "WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
	if len(got) != 1 {
		t.Errorf("handler ran %d times, want once: only with a valid token", len(got))
	}
}

// TestHandleUsersMe: GET /users/me through the whole server answers the
// token's user, only id and email, never cached; the two 401s otherwise.
func TestHandleUsersMe(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	w := ts.me(t, token)
	if body := checkJSON(t, w, 200, map[string]any{"id": 1, "email": testEmail}); len(body) != 2 {
		t.Errorf("body = %s, want only id and email", w.Body)
	}
	checkHeaders(t, w, "Cache-Control", "no-store")
	w = ts.do(t, request{method: "GET", path: "/users/me"})
	checkDetail(t, w, 401, "Not authenticated")
	checkHeaders(t, w, "WWW-Authenticate", `Bearer realm="api"`)
	w = ts.me(t, "garbage")
	checkDetail(t, w, 401, "Could not validate credentials")
	checkHeaders(t, w, "WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
}

// TestTokenLifetime moves the clock: a token opens /users/me for 30
// minutes, and not a second longer.
func TestTokenLifetime(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	steps := []struct {
		advance time.Duration
		status  int
	}{
		{0, 200},
		{29 * time.Minute, 200},
		{59 * time.Second, 200},
		{time.Second, 401}, // exactly 30 minutes: exp equal to now is expired
		{time.Minute, 401}, // 31 minutes
	}
	for _, s := range steps {
		ts.clock.advance(s.advance)
		if w := ts.me(t, token); w.Code != s.status {
			t.Errorf("at %v: status = %d, want %d", ts.clock.now().Sub(time.Unix(testStart, 0)), w.Code, s.status)
		}
	}
}

// TestHandleRegister: POST /register through the whole server, one row per
// answer; the rules' variants are TestValidateEmail's and
// TestValidatePassword's, the body's TestDecodeJSON's. Nothing is stored
// but for a 201.
func TestHandleRegister(t *testing.T) {
	const text = "text/plain"
	tests := []struct {
		name        string
		contentType string
		body        string
		status      int
		words       []string // for an error: what the detail must mention
	}{
		{"created, the email trimmed and lower-cased", "", creds("  Ann@Example.COM ", testPassword), 201, nil},
		{"content type with charset", "application/json; charset=utf-8", creds(testEmail, testPassword), 201, nil},
		{"unknown fields ignored", "", `{"email":"ann@example.com","password":"correct horse battery","admin":true}`, 201,
			nil},
		{"an invalid email", "", creds("Ann <ann@example.com>", testPassword), 422, []string{"email"}},
		{"a short password", "", creds(testEmail, "12345678"), 422, []string{"password", "15"}},
		{"email missing", "", `{"password":"correct horse battery"}`, 422, []string{"email", "required"}},
		{"password not a string", "", `{"email":"ann@example.com","password":["x"]}`, 422, []string{"password", "string"}},
		{"email named twice", "", `{"email":"red@example.com","email":"ann@example.com","password":"x"}`, 422,
			[]string{`"email"`, "twice"}},
		{"malformed JSON", "", `{"email":"ann@example.com",`, 422, []string{"JSON"}},
		{"not UTF-8", "", "{\"email\":\"ann@example.com\",\"password\":\"correct horse \xff\"}", 422, []string{"UTF-8"}},
		{"text content type", text, creds(testEmail, testPassword), 415, []string{"JSON"}},
		{"form content type", formType, "email=ann%40example.com&password=12345678", 415, []string{"JSON"}},
		{"no content type", "none", creds(testEmail, testPassword), 415, []string{"JSON"}},
		{"body over 64 KiB", "", creds(testEmail, strings.Repeat("p", 64<<10)), 413, []string{"64 KiB"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTestServer(t, serverConfig{})
			req := postJSON("/register", tt.body)
			switch tt.contentType {
			case "none":
				req.contentType = ""
			case "":
			default:
				req.contentType = tt.contentType
			}
			w := ts.do(t, req)
			if tt.status != http.StatusCreated {
				checkDetail(t, w, tt.status, tt.words...)
				if _, err := os.Stat(ts.path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("users file written after a %d: %v", tt.status, err)
				}
				return
			}
			if body := checkJSON(t, w, 201, map[string]any{"id": 1, "email": testEmail}); len(body) != 2 {
				t.Errorf("body = %s, want only id and email", w.Body)
			}
			checkHeaders(t, w, "Cache-Control", "no-store")
			if u, _ := ts.users.lookup(testEmail); !verifyPassword(testPassword, u.PasswordHash) ||
				hashCost(u.PasswordHash) != bcrypt.MinCost {
				t.Errorf("stored %+v, want a hash of the password at the server's cost", u)
			}
		})
	}
}

func TestHandleRegisterDuplicateEmail(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, map[string]any{"id": 1})
	for _, email := range []string{testEmail, "ANN@example.com", " Ann@Example.com"} {
		checkJSON(t, ts.register(t, email, "another password"), 409, map[string]any{"detail": "Email already registered"})
	}
	checkJSON(t, ts.register(t, "bob@example.com", testPassword), 201, map[string]any{"id": 2, "email": "bob@example.com"})
}

func TestHandleRegisterConcurrentSameEmail(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	const n = 20
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			email := fmt.Sprintf(" ANN@example.com%s", strings.Repeat(" ", i%3)) // one email, spelled variously
			codes <- ts.register(t, email, testPassword).Code
		})
	}
	wg.Wait()
	close(codes)
	count := map[int]int{}
	for code := range codes {
		count[code]++
	}
	if count[201] != 1 || count[409] != n-1 {
		t.Errorf("statuses = %v, want one 201 and %d 409s", count, n-1)
	}
}

// TestHandleLogin: POST /login through the whole server, one row per
// answer; the password's variants are TestAuthenticateUser's, the body's
// TestReadCredentials's. A 200 carries a token for the user, uncached.
func TestHandleLogin(t *testing.T) {
	tests := []struct {
		name   string
		req    request
		status int
		detail string // the exact detail of an error
	}{
		{"JSON", postJSON("/login", creds(" ANN@Example.com ", testPassword)), 200, ""},
		{"form", postForm("/login", formCreds(testEmail, testPassword)), 200, ""},
		{"unknown email", postJSON("/login", creds("bob@example.com", testPassword)), 401, "Invalid email or password"},
		{"wrong password", postJSON("/login", creds(testEmail, "wrong password")), 401, "Invalid email or password"},
		{"form, wrong password", postForm("/login", formCreds(testEmail, "wrong")), 401, "Invalid email or password"},
		{"form, other grant_type", postForm("/login", "grant_type=client_credentials&username=a&password=x"), 400,
			"unsupported grant_type"},
		{"JSON, password missing", postJSON("/login", `{"email":"ann@example.com"}`), 422, "password is required"},
		{"form, password missing", postForm("/login", "username=ann%40example.com"), 422, "password is required, once"},
		{"form holding JSON, as curl -d sends it", postForm("/login", creds(testEmail, testPassword)), 415,
			"body looks like JSON: send it with Content-Type: application/json"},
		{"other content type", request{method: "POST", path: "/login", contentType: "text/plain", body: "x"}, 415,
			"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)"},
		{"body over 64 KiB", postForm("/login", "username=a&password="+strings.Repeat("p", 64<<10)), 413,
			"body must be at most 64 KiB"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTestServer(t, serverConfig{})
			ts.register(t, testEmail, testPassword)
			w := ts.do(t, tt.req)
			if tt.status != http.StatusOK {
				checkLoginError(t, w, tt.req, tt.status, tt.detail)
				if tt.status == http.StatusUnauthorized {
					checkHeaders(t, w, "WWW-Authenticate", `Bearer realm="api"`)
				}
				return
			}
			body := checkJSON(t, w, 200, map[string]any{"token_type": "bearer", "expires_in": 1800})
			if len(body) != 3 {
				t.Errorf("body = %s, want access_token, token_type, expires_in", w.Body)
			}
			checkHeaders(t, w, "Cache-Control", "no-store", "Pragma", "no-cache")
			token, _ := body["access_token"].(string)
			if sub, _, err := verifyAccessToken(token, []byte(testSecret), ts.clock.now()); err != nil || sub != testEmail {
				t.Errorf("verifyAccessToken(access_token) = %q, %v; want %q, nil", sub, err, testEmail)
			}
		})
	}
}

// oauthCodes is the RFC 6749 section 5.2 error code each detail of a form
// login's failure carries.
var oauthCodes = map[string]string{
	"Invalid email or password":  "invalid_grant",
	"unsupported grant_type":     "unsupported_grant_type",
	"password is required, once": "invalid_request",
	"username is required, once": "invalid_request",
	"body must be valid UTF-8":   "invalid_request",
	"body is not a valid form":   "invalid_request",
}

// checkLoginError checks a login's failure: exactly {"detail"} for JSON,
// and for the OAuth2 form, where the detail has an OAuth2 code, also
// error and error_description, which OAuth2 clients read.
func checkLoginError(t *testing.T, w *httptest.ResponseRecorder, req request, status int, detail string) {
	t.Helper()
	code, ok := oauthCodes[detail]
	if !strings.HasPrefix(req.contentType, formType) || !ok {
		checkDetail(t, w, status)
		checkJSON(t, w, status, map[string]any{"detail": detail})
		return
	}
	if body := checkJSON(t, w, status, map[string]any{"detail": detail, "error": code,
		"error_description": detail}); len(body) != 3 {
		t.Errorf("form error body = %s, want detail, error, error_description", w.Body)
	}
}

// TestHandleLoginFailuresAlike checks that every failed login answers the
// same bytes and headers, so none tells which emails are registered.
func TestHandleLoginFailuresAlike(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	ts.register(t, testEmail, testPassword)
	for _, tt := range []struct {
		unknown *httptest.ResponseRecorder
		others  []*httptest.ResponseRecorder
	}{
		{ts.login(t, "nobody@example.com", testPassword), []*httptest.ResponseRecorder{
			ts.login(t, testEmail, "wrong password"), ts.login(t, testEmail, testPassword+strings.Repeat("x", 100))}},
		{ts.do(t, postForm("/login", formCreds("nobody@example.com", testPassword))), []*httptest.ResponseRecorder{
			ts.do(t, postForm("/login", formCreds(testEmail, "nope")))}},
	} {
		for _, w := range tt.others {
			if w.Code != tt.unknown.Code || w.Body.String() != tt.unknown.Body.String() ||
				fmt.Sprint(w.Header()) != fmt.Sprint(tt.unknown.Header()) {
				t.Errorf("failure = %d %v %s, want %d %v %s as for an unknown email",
					w.Code, w.Header(), w.Body, tt.unknown.Code, tt.unknown.Header(), tt.unknown.Body)
			}
		}
	}
}

// The account's own routes: log out, change the password, delete the
// account. Each ends tokens by giving the user a new session, or none.

// checkEnded checks that each token is refused as a token whose session
// has ended.
func (ts *testServer) checkEnded(t *testing.T, tokens ...string) {
	t.Helper()
	for i, token := range tokens {
		w := ts.me(t, token)
		checkDetail(t, w, 401, "Could not validate credentials")
		if got := w.Header().Get("WWW-Authenticate"); got != `Bearer realm="api", error="invalid_token"` {
			t.Errorf("token %d: WWW-Authenticate = %q", i, got)
		}
	}
}

// checkDurable checks that the last change reached the disk in order: the
// temporary file synced, renamed over the users file, the folder synced.
func checkDurable(t *testing.T, steps *[]string) {
	t.Helper()
	if got := strings.Join(*steps, ", "); got != "sync file, rename, sync folder" {
		t.Errorf("disk steps = %s, want sync file, rename, sync folder", got)
	}
	*steps = nil
}

// account requests, each with token.
func logout(token string) request { return bearer(request{method: "POST", path: "/logout"}, token) }

func changePassword(token, current, next string) request {
	body, _ := json.Marshal(map[string]string{"current_password": current, "new_password": next})
	return bearer(postJSON("/users/me/password", string(body)), token).withMethod("PUT")
}

func deleteAccount(token, password string) request {
	body, _ := json.Marshal(map[string]string{"password": password})
	return bearer(postJSON("/users/me", string(body)), token).withMethod("DELETE")
}

func (req request) withMethod(method string) request { req.method = method; return req }

// TestHandleLogout: a logout ends every token of the user, on every device,
// and a login right after, in the same second, gets a token that works.
func TestHandleLogout(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	laptop := ts.token(t)
	phone := ts.tokenFor(t, testEmail, testPassword)
	steps := watchDisk(ts.users, "")
	w := ts.do(t, logout(laptop))
	if w.Code != 204 || w.Body.Len() != 0 {
		t.Fatalf("logout = %d %q, want 204 and no body", w.Code, w.Body)
	}
	checkDurable(t, steps)
	ts.checkEnded(t, laptop, phone)
	ts.checkEnded(t, laptop) // a second logout with an ended token
	checkDetail(t, ts.do(t, logout(laptop)), 401, "Could not validate credentials")
	checkDetail(t, ts.do(t, request{method: "POST", path: "/logout"}), 401, "Not authenticated")
	again := ts.tokenFor(t, testEmail, testPassword) // the same second on the fake clock
	checkJSON(t, ts.me(t, again), 200, map[string]any{"email": testEmail})
	restarted := newTestServer(t, serverConfig{usersPath: ts.path})
	restarted.checkEnded(t, phone)
	checkJSON(t, restarted.me(t, again), 200, nil)
}

// TestHandleChangePassword: the current password confirmed, the new one
// checked by the registration's rules, and then a fresh token that works,
// while every token issued before is refused; the new password logs in,
// the old one gets the vague 401. Each refusal changes nothing.
func TestHandleChangePassword(t *testing.T) {
	const next = "a new and longer passphrase"
	ts := newTestServer(t, serverConfig{maxPerAccount: noLimit})
	token := ts.token(t)
	other := ts.tokenFor(t, testEmail, testPassword)
	refusals := []struct {
		req    request
		status int
		detail string
	}{
		{changePassword(token, "wrong", next), 400, "Incorrect password"},
		{changePassword(token, testPassword, "short"), 422, "password must be at least 15 characters"},
		{changePassword(token, testPassword, strings.Repeat("p", 73)), 422,
			"password must be at most 72 bytes (the limit of bcrypt)"},
		{changePassword(token, "wrong", "short"), 422, "password must be at least 15 characters"},
		{changePassword(token, testPassword, testPassword), 422, "new_password must differ from current_password"},
		{bearer(postJSON("/users/me/password", `{"new_password":"a new and longer passphrase"}`), token).withMethod("PUT"),
			422, "current_password is required"},
		{bearer(postJSON("/users/me/password", `{"current_password":"x","current_password":"y"}`), token).withMethod("PUT"),
			422, `body names "current_password" twice`},
		{changePassword(token, testPassword, next).withHeader("Content-Type", "text/plain"), 415,
			"body must be JSON, sent with Content-Type: application/json"},
		{changePassword("", testPassword, next), 401, "Could not validate credentials"},
	}
	for _, r := range refusals {
		checkJSON(t, ts.do(t, r.req), r.status, map[string]any{"detail": r.detail})
	}
	checkJSON(t, ts.me(t, token), 200, nil) // nothing changed

	steps := watchDisk(ts.users, "")
	w := ts.do(t, changePassword(token, testPassword, next))
	body := checkJSON(t, w, 200, map[string]any{"token_type": "bearer", "expires_in": 1800})
	checkHeaders(t, w, "Cache-Control", "no-store", "Pragma", "no-cache")
	checkDurable(t, steps)
	ts.checkEnded(t, token, other)
	fresh, _ := body["access_token"].(string)
	checkJSON(t, ts.me(t, fresh), 200, map[string]any{"email": testEmail})
	checkJSON(t, ts.login(t, testEmail, testPassword), 401, map[string]any{"detail": "Invalid email or password"})
	checkJSON(t, ts.login(t, testEmail, next), 200, nil)
	checkJSON(t, newTestServer(t, serverConfig{usersPath: ts.path}).login(t, testEmail, next), 200, nil)
}

// TestHandleDeleteAccount: the password confirmed, the user is gone from
// the users file, its tokens refused, a login with its email the vague
// 401; the email registers again, with a new id, and no token of the
// deleted account opens the new one, even in the same second.
func TestHandleDeleteAccount(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	ts.register(t, "bob@example.com", testPassword)
	checkJSON(t, ts.do(t, deleteAccount(token, "wrong")), 400, map[string]any{"detail": "Incorrect password"})
	checkDetail(t, ts.do(t, bearer(postJSON("/users/me", `{}`), token).withMethod("DELETE")), 422, "password is required")
	checkJSON(t, ts.me(t, token), 200, nil)

	steps := watchDisk(ts.users, "")
	if w := ts.do(t, deleteAccount(token, testPassword)); w.Code != 204 || w.Body.Len() != 0 {
		t.Fatalf("delete = %d %q, want 204 and no body", w.Code, w.Body)
	}
	checkDurable(t, steps)
	if f := readStoreFile(t, ts.path); len(f.Users) != 1 || f.Users[0].Email != "bob@example.com" || f.NextID != 3 {
		t.Errorf("users file = %+v, want bob alone and next_id 3", f)
	}
	ts.checkEnded(t, token)
	checkJSON(t, ts.login(t, testEmail, testPassword), 401, map[string]any{"detail": "Invalid email or password"})
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, map[string]any{"id": 3})
	ts.checkEnded(t, token)
	checkJSON(t, ts.me(t, ts.tokenFor(t, testEmail, testPassword)), 200, map[string]any{"id": 3})
}

// TestSessions: what binds a token to its account. A user removed from the
// file by hand and registered again is not opened by the old account's
// tokens; a users file written before sessions existed loads, and its
// users get tokens that work until they log out; a rehash ends no token,
// and no other login writes the file.
func TestSessions(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	old := ts.token(t)
	f := readStoreFile(t, ts.path)
	f.Users = nil
	os.WriteFile(ts.path, storeFileBytes(f), 0o600) // removed by hand, the server stopped
	again := newTestServer(t, serverConfig{usersPath: ts.path})
	again.register(t, testEmail, testPassword)
	again.checkEnded(t, old)

	cheap := mustHash(t, testPassword, bcrypt.MinCost)
	path := filepath.Join(t.TempDir(), "users.json")
	os.WriteFile(path, []byte(`{"next_id":2,"users":[{"id":1,"email":"ann@example.com","password_hash":"`+cheap+`"}]}`),
		0o600)
	before := newTestServer(t, serverConfig{usersPath: path, cost: bcrypt.MinCost + 1})
	token := before.tokenFor(t, testEmail, testPassword) // and the hash rehashed at the server's cost
	if u, _ := before.users.lookup(testEmail); hashCost(u.PasswordHash) != bcrypt.MinCost+1 {
		t.Errorf("hash cost %d after a login, want the rehash's %d", hashCost(u.PasswordHash), bcrypt.MinCost+1)
	}
	checkJSON(t, before.me(t, token), 200, map[string]any{"email": testEmail})
	steps := watchDisk(before.users, "")
	for _, email := range []string{testEmail, testEmail, "nobody@example.com"} { // no login writes the file
		before.login(t, email, testPassword)
	}
	if len(*steps) != 0 {
		t.Errorf("logins at the server's cost wrote the users file: %v", *steps)
	}
	checkJSON(t, newTestServer(t, serverConfig{usersPath: path}).me(t, token), 200, nil)
	before.do(t, logout(token))
	before.checkEnded(t, token)
}

// TestReadCredentials: a login's body read as JSON or as the OAuth2
// password form, and each way it is refused. The password is taken from the
// body only, never from the URL.
func TestReadCredentials(t *testing.T) {
	tests := []struct {
		name        string
		contentType string
		body        string
		query       string // appended to the URL
		status      int    // 200 for read
		detail      string // the exact detail of an error, or what the body read holds
	}{
		{"JSON", "application/json", creds(testEmail, testPassword), "", 200, testEmail + " " + testPassword},
		{"JSON-based type", "application/merge-patch+json", creds("a", "b"), "", 200, "a b"},
		{"JSON, empty strings", "application/json", creds("", ""), "", 200, " "},
		{"form with grant_type", formType, formCreds(testEmail, testPassword), "", 200, testEmail + " " + testPassword},
		{"form without grant_type", formType, "username=a&password=b", "", 200, "a b"},
		{"form with charset, scope and client_id", formType + "; charset=utf-8", "username=a&password=b&scope=&client_id=",
			"", 200, "a b"},
		{"JSON, email missing", "application/json", `{"password":"x"}`, "", 422, "email is required"},
		{"JSON, email null", "application/json", `{"email":null,"password":"x"}`, "", 422, "email is required"},
		{"JSON, password a number", "application/json", `{"email":"a","password":12345678}`, "", 422,
			"password must be a string"},
		{"form, other grant_type", formType, "grant_type=client_credentials&username=a&password=x", "", 400,
			"unsupported grant_type"},
		{"form, empty grant_type", formType, "grant_type=&username=a&password=x", "", 400, "unsupported grant_type"},
		{"form, two grant_types", formType, "grant_type=password&grant_type=password&username=a&password=x", "", 400,
			"unsupported grant_type"},
		{"form, password in the URL only", formType, "username=a", "?password=x", 422, "password is required, once"},
		{"form, username twice", formType, "username=a&username=b&password=x", "", 422, "username is required, once"},
		{"form, username missing", formType, "password=x", "", 422, "username is required, once"},
		{"form, password not UTF-8", formType, "username=a&password=%FF", "", 422, "body must be valid UTF-8"},
		{"form, another field not UTF-8", formType, "username=a&password=x&scope=%C0", "", 422, "body must be valid UTF-8"},
		{"form, malformed", formType, "username=%zz&password=x", "", 422, "body is not a valid form"},
		{"form holding JSON", formType, " " + creds("a", "b"), "", 415,
			"body looks like JSON: send it with Content-Type: application/json"},
		{"text", "text/plain", creds("a", "b"), "", 415,
			"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)"},
		{"multipart", "multipart/form-data; boundary=x", "--x--", "", 415,
			"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)"},
		{"no content type", "", creds("a", "b"), "", 415,
			"body must be JSON or an OAuth2 form (Content-Type: application/x-www-form-urlencoded)"},
		{"JSON over 64 KiB", "application/json", creds("a", strings.Repeat("p", 64<<10)), "", 413,
			"body must be at most 64 KiB"},
		{"form over 64 KiB", formType, "username=a&password=" + strings.Repeat("p", 64<<10), "", 413,
			"body must be at most 64 KiB"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var email, password string
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var ok bool
				if email, password, ok = readCredentials(w, r); ok {
					w.WriteHeader(http.StatusOK)
				}
			})
			req := request{method: "POST", path: "/login" + tt.query, contentType: tt.contentType, body: tt.body}
			w, _ := send(h, req)
			if w.Code != tt.status {
				t.Fatalf("status = %d, want %d (body %s)", w.Code, tt.status, w.Body)
			}
			if tt.status == http.StatusOK {
				if got := email + " " + password; got != tt.detail {
					t.Errorf("read %q, want %q", got, tt.detail)
				}
				return
			}
			checkJSON(t, w, tt.status, map[string]any{"detail": tt.detail})
		})
	}
}

// TestReadAll: a body of declared size is read into an allocation of its
// size, once, and one that declares none, or another size, is read whole.
func TestReadAll(t *testing.T) {
	data := bytes.Repeat([]byte("b"), 64<<10)
	allocated := func(read func()) uint64 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range 10 {
			read()
		}
		runtime.ReadMemStats(&after)
		return (after.TotalAlloc - before.TotalAlloc) / 10
	}
	sized := allocated(func() { readAll(bytes.NewReader(data), int64(len(data))) })
	doubling := allocated(func() { io.ReadAll(bytes.NewReader(data)) })
	if sized > doubling*2/3 {
		t.Errorf("reading 64 KiB of declared size allocated %d bytes, io.ReadAll %d; want its size once, well below", sized,
			doubling)
	}
	for _, declared := range []int64{-1, 0, 10, 1 << 20} {
		if got, err := readAll(bytes.NewReader(data), declared); err != nil || !bytes.Equal(got, data) {
			t.Errorf("declared %d: read %d bytes, %v; want all", declared, len(got), err)
		}
	}
}

// TestThrottleWholeBody: a login of exactly 64 KiB, the largest body there
// is, is counted like any other: the throttle reads all of it.
func TestThrottleWholeBody(t *testing.T) {
	checked := 0
	h, _, _ := throttled(5, 100, 100, &checked)
	head := `{"email":"ann@example.com","password":"a wrong guess","pad":"`
	body := head + strings.Repeat("x", 64<<10-len(head)-2) + `"}`
	for range 5 {
		send(h, postJSON("/login", body))
	}
	w, _ := send(h, postJSON("/login", body))
	checkThrottled(t, w, "900")
}

// TestReadBody: the 64 KiB limit holds when only reading the body finds its
// size (chunked encoding), and when the object is small but followed by
// more than 64 KiB.
func TestReadBody(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	for _, body := range []string{creds(testEmail, strings.Repeat("p", 64<<10)), creds(testEmail,
		testPassword) + strings.Repeat(" ", 64<<10)} {
		req := postJSON("/register", body)
		req.chunked = true
		checkDetail(t, ts.do(t, req), http.StatusRequestEntityTooLarge, "64 KiB")
	}
	if _, found := ts.users.lookup(testEmail); found {
		t.Error("user stored from a body over 64 KiB")
	}
	w, _ := send(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if body, ok := readBody(w, r); ok {
			w.Write(body)
		}
	}), postJSON("/", strings.Repeat("b", 64<<10)))
	if w.Code != 200 || w.Body.Len() != 64<<10 {
		t.Errorf("a body of exactly 64 KiB: %d, %d bytes; want it read whole", w.Code, w.Body.Len())
	}
}

// TestDecodeJSON holds the strict reading of a JSON body: one object, valid
// UTF-8, member names exactly as written, none given twice, numbers in
// range; each refusal a sentence naming what is wrong.
func TestDecodeJSON(t *testing.T) {
	tests := []struct {
		name, data string
		want       string   // for a body read: "email password", "-" for a missing one
		words      []string // for a refusal: what the error must mention
	}{
		{"both", creds("a", "b"), "a b", nil},
		{"unknown members ignored", `{"email":"a","password":"b","name":"Ann","x":[1,{"y":null}]}`, "a b", nil},
		{"spaces around", " \n{ \"email\" : \"a\" }\t", "a -", nil},
		{"escaped names", `{"em\u0061il":"a"}`, "a -", nil},
		{"null members", `{"email":null,"password":null}`, "- -", nil},
		{"EMAIL and PASSWORD in capitals: unknown members", `{"EMAIL":"a","PASSWORD":"b"}`, "- -", nil},
		{"Password: an unknown member", `{"email":"a","Password":"b"}`, "a -", nil},
		{"password with a long s: an unknown member", `{"email":"a","paſſword":"b"}`, "a -", nil},
		{"a literal U+FFFD, a character like any other", `{"email":"a","password":"\uFFFD"}`, "a \uFFFD", nil},

		{"email named twice", `{"email":"red@example.com","email":"blue@example.com"}`, "", []string{`"email"`, "twice"}},
		{"password named twice, once escaped", `{"password":"a","pass\u0077ord":"b"}`, "", []string{`"password"`, "twice"}},
		{"an unknown member named twice", `{"email":"a","x":1,"x":2}`, "", []string{`"x"`, "twice"}},
		{"a name twice inside an unknown member", `{"email":"a","x":{"y":1,"y":2}}`, "", []string{`"y"`, "twice"}},
		{"a number out of range", `{"email":"a","x":1e999}`, "", []string{"1e999", "out of range"}},
		{"email a number", `{"email":5}`, "", []string{"email", "string"}},
		{"password an array", `{"password":["b"]}`, "", []string{"password", "string"}},
		{"malformed", `{"email":"a",`, "", []string{"JSON", "byte 13"}},
		{"a syntax error in a member", `{"email" "a"}`, "", []string{"JSON", `"email"`}},
		{"trailing data", creds("a", "b") + ` {}`, "", []string{"one valid JSON object"}},
		{"trailing garbage", creds("a", "b") + `x`, "", []string{"one valid JSON object"}},
		{"empty", ``, "", []string{"one JSON object"}},
		{"an array", `[]`, "", []string{"one JSON object"}},
		{"a string", `"ann"`, "", []string{"one JSON object"}},
		{"null", `null`, "", []string{"one JSON object"}},
		{"not UTF-8", "{\"email\":\"a\",\"password\":\"b\xff\"}", "", []string{"UTF-8"}},
		{"an unknown member not UTF-8", "{\"email\":\"a\",\"name\":\"\xc0\"}", "", []string{"UTF-8"}},
		{"half a surrogate pair", `{"email":"a","password":"\ud800"}`, "", []string{"JSON", `"password"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body credentials
			err := decodeJSON([]byte(tt.data), &body)
			if tt.words == nil {
				str := func(s *string) string { return cmpOr(s, "-") }
				if got := str(body.Email) + " " + str(body.Password); err != nil || got != tt.want {
					t.Errorf("decodeJSON = %q, %v; want %q", got, err, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("decodeJSON = nil, want an error mentioning %q", tt.words)
			}
			for _, word := range tt.words {
				if !strings.Contains(err.Error(), word) {
					t.Errorf("error %q does not mention %q", err, word)
				}
			}
		})
	}
}

// cmpOr returns *s, or alt for a nil s.
func cmpOr(s *string, alt string) string {
	if s == nil {
		return alt
	}
	return *s
}

// TestNormalizeEmail: surrounding ASCII spaces trimmed, ASCII letters
// lower-cased, nothing else changed: the Kelvin sign does not become k.
func TestNormalizeEmail(t *testing.T) {
	for in, want := range map[string]string{
		"  Ann@Example.COM ":      "ann@example.com",
		"\tann@example.com\r\n":   "ann@example.com",
		"\u212aate@example.com":   "\u212aate@example.com",
		"\u00a0ann@example.com":   "\u00a0ann@example.com",
		"ÀNN@example.com":         "Ànn@example.com",
		"AZ@[`{.example":          "az@[`{.example", // A and Z lowered, @ [ ` { kept
		"a+B&c@Xn--Bcher-Kva.Com": "a+b&c@xn--bcher-kva.com",
	} {
		if got := normalizeEmail(in); got != want {
			t.Errorf("normalizeEmail(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestValidateEmail: a bare address of printable ASCII, at most 254 bytes.
// ASCII alone leaves no look-alike spellings: each row outside it names
// the character at fault.
func TestValidateEmail(t *testing.T) {
	long := strings.Repeat("a", 64) + "@" + strings.Repeat("b", 63) + "." + strings.Repeat("c",
		63) + "." + strings.Repeat("d", 57) + ".com"
	tests := []struct {
		email string
		words []string // nil for valid
	}{
		{testEmail, nil},
		{long, nil}, // 254 bytes
		{"a+b&c@example.com", nil},
		{"!#$%&'*+-/=?^_`{|}~@example.com", nil}, // the printable ASCII ends, ! and ~
		{"ann@xn--bcher-kva.example", nil},
		{"x" + long, []string{"254"}},
		{"ann.example.com", []string{"plain address"}},
		{"ann@", []string{"plain address"}},
		{"", []string{"plain address"}},
		{"Ann <ann@example.com>", []string{"ASCII", "U+0020"}},
		{"<ann@example.com>", []string{"plain address"}},
		{"ann@example.com(Ann)", []string{"plain address"}},
		{"jos\u00e9@example.com", []string{"ASCII", "U+00E9", "byte 3"}},
		{"jose\u0301@example.com", []string{"U+0301"}},
		{"\u212aate@example.com", []string{"U+212A"}},
		{"ann\u3164@example.com", []string{"U+3164"}},
		{"ann\ufe0f@example.com", []string{"U+FE0F"}},
		{"ann\u200b@example.com", []string{"U+200B"}},
		{"\ufeffann@example.com", []string{"U+FEFF"}},
		{"ann\u202e@example.com", []string{"U+202E"}},
		{"ann\u0085@example.com", []string{"U+0085"}},
		{"ann\u00a0@example.com", []string{"U+00A0"}},
		{"\u00a0ann@example.com", []string{"U+00A0"}},
		{"ann\t@example.com", []string{"U+0009"}},
	}
	for _, tt := range tests {
		err := validateEmail(tt.email)
		if (err == nil) != (tt.words == nil) {
			t.Errorf("validateEmail(%q) = %v, want valid: %v", tt.email, err, tt.words == nil)
			continue
		}
		for _, word := range tt.words {
			if !strings.Contains(err.Error(), word) || !strings.Contains(err.Error(), "email") {
				t.Errorf("validateEmail(%q) = %q, want it to mention email and %q", tt.email, err, word)
			}
		}
	}
}

// TestValidatePassword: NIST SP 800-63B-4's rules: 15 characters or more,
// counted as code points; 72 bytes at most (bcrypt's); not the email, nor
// holding its local part of 4 characters or more; no composition rules.
func TestValidatePassword(t *testing.T) {
	tests := []struct {
		password, email string
		words           []string // nil for valid
	}{
		{strings.Repeat("p", 15), testEmail, nil},
		{strings.Repeat("é", 15), testEmail, nil}, // 30 bytes
		{strings.Repeat("p", 72), testEmail, nil},
		{strings.Repeat("é", 36), testEmail, nil}, // 72 bytes
		{"123456789012345", testEmail, nil},
		{"ann is my password", testEmail, nil}, // a local part of 3
		{"admin-password-here", "admin", nil},  // an email without @, from a hand-edited file
		{strings.Repeat("p", 14), testEmail, []string{"15 characters"}},
		{strings.Repeat("é", 14), testEmail, []string{"15 characters"}},
		{"12345678", testEmail, []string{"15 characters"}},
		{strings.Repeat("p", 73), testEmail, []string{"72 bytes"}},
		{strings.Repeat("é", 37), testEmail, []string{"72 bytes"}},
		{"anna-is-my-password", "anna@example.com", []string{`"anna"`, "before the @"}},
		{"my name is ANNA, hi", "anna@example.com", []string{`"anna"`}},
		{"BO@example.co.uk", "bo@example.co.uk", []string{"the email"}},
		{"admin", "admin", []string{"15 characters"}},
	}
	for _, tt := range tests {
		err := validatePassword(tt.password, tt.email)
		if (err == nil) != (tt.words == nil) {
			t.Errorf("validatePassword(%q, %q) = %v, want valid: %v", tt.password, tt.email, err, tt.words == nil)
			continue
		}
		for _, word := range tt.words {
			if !strings.Contains(err.Error(), word) || !strings.Contains(err.Error(), "password") {
				t.Errorf("validatePassword(%q, %q) = %q, want it to mention password and %q", tt.password, tt.email, err, word)
			}
		}
	}
}

// 3. Other routes

func TestHandleHealthz(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	checkJSON(t, ts.do(t, request{method: "GET", path: "/healthz"}), 200, map[string]any{"status": "ok"})
}

// openAPIDoc is the part of openapi.json that tests read.
type openAPIDoc struct {
	OpenAPI string
	Paths   map[string]map[string]struct {
		OperationID string
		Security    []map[string][]string
		Responses   map[string]any
		RequestBody struct {
			Content map[string]struct {
				Schema struct {
					Ref string `json:"$ref"`
				}
				Example map[string]string
			}
		}
	}
	Components struct {
		Schemas map[string]struct {
			Properties map[string]struct {
				Format, Pattern, Description string
				MinLength, MaxLength         int
				Examples                     []string
			}
		}
		SecuritySchemes map[string]struct {
			Type  string
			Flows map[string]struct{ TokenURL string }
		}
	}
}

// readOpenAPI decodes the repository's openapi.json.
func readOpenAPI(tb testing.TB) openAPIDoc {
	tb.Helper()
	data, err := os.ReadFile("openapi.json")
	if err != nil {
		tb.Fatal(err)
	}
	var doc openAPIDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		tb.Fatalf("openapi.json is not JSON: %v", err)
	}
	return doc
}

// documentedStatuses returns each route and status openapi.json documents,
// as "POST /login 401".
func documentedStatuses(tb testing.TB) map[string]bool {
	documented := map[string]bool{}
	for path, methods := range readOpenAPI(tb).Paths {
		for method, op := range methods {
			for status := range op.Responses {
				documented[strings.ToUpper(method)+" "+path+" "+status] = true
			}
		}
	}
	return documented
}

// routes is every route newServer serves. A route added there without a
// test never reaches ts.do's check that openapi.json documents it: list it
// here, and TestOpenAPIDocument holds it to the document and the mux.
var routes = []string{
	"POST /register", "POST /login", "GET /users/me",
	"POST /logout", "PUT /users/me/password", "DELETE /users/me",
	"GET /healthz", "GET /openapi.json", "GET /docs",
}

// TestOpenAPIDocument: openapi.json is OpenAPI 3.1, documents exactly the
// routes the server serves, and declares the oauth2 password flow through
// /login that /users/me uses.
func TestOpenAPIDocument(t *testing.T) {
	doc := readOpenAPI(t)
	if !strings.HasPrefix(doc.OpenAPI, "3.1.") {
		t.Errorf("openapi = %q, want 3.1.x", doc.OpenAPI)
	}
	var documented []string
	for path, methods := range doc.Paths {
		for method := range methods {
			documented = append(documented, strings.ToUpper(method)+" "+path)
		}
	}
	slices.Sort(documented)
	if want := slices.Sorted(slices.Values(routes)); !slices.Equal(documented, want) {
		t.Errorf("openapi.json documents %q; the server serves %q", documented, want)
	}
	ts := newTestServer(t, serverConfig{})
	for _, route := range routes {
		method, path, _ := strings.Cut(route, " ")
		if _, r := send(ts.handler, request{method: method, path: path}); r.Pattern != route {
			t.Errorf("%s reaches route %q, want %q: newServer does not serve it", route, r.Pattern, route)
		}
	}
	ids := map[string]string{}
	for path, methods := range doc.Paths {
		for method, op := range methods {
			if other, taken := ids[op.OperationID]; taken || op.OperationID == "" {
				t.Errorf("%s %s: operationId %q, which %s has too; give each route its own", method, path, op.OperationID, other)
			}
			ids[op.OperationID] = method + " " + path
		}
	}
	scheme := doc.Components.SecuritySchemes["OAuth2PasswordBearer"]
	if scheme.Type != "oauth2" || scheme.Flows["password"].TokenURL != "/login" {
		t.Errorf("security scheme = %+v, want oauth2 with a password flow through /login", scheme)
	}
	if security := doc.Paths["/users/me"]["get"].Security; len(security) != 1 ||
		security[0]["OAuth2PasswordBearer"] == nil {
		t.Errorf("/users/me security = %v, want OAuth2PasswordBearer", security)
	}
}

// TestOpenAPIRegistrationRules: /register's request schema carries the
// rules JSON Schema can say, its descriptions the rest, and its examples
// are registrations the server takes. The login schema is as permissive as
// the server.
func TestOpenAPIRegistrationRules(t *testing.T) {
	doc := readOpenAPI(t)
	schema := func(path string) string {
		return strings.TrimPrefix(doc.Paths[path]["post"].RequestBody.Content["application/json"].Schema.Ref,
			"#/components/schemas/")
	}
	if schema("/register") != "Registration" || schema("/login") != "Credentials" {
		t.Fatalf("request schemas: /register %q, /login %q; want Registration, Credentials", schema("/register"),
			schema("/login"))
	}
	reg := doc.Components.Schemas["Registration"].Properties
	email, password := reg["email"], reg["password"]
	if email.Format != "email" || email.MaxLength != maxEmailBytes || email.Pattern != "^[!-~]+$" {
		t.Errorf("Registration email = %+v; want format email, maxLength 254, pattern ^[!-~]+$", email)
	}
	if password.MinLength != minPasswordChars || password.MaxLength != 0 {
		t.Errorf("Registration password: minLength %d, maxLength %d; "+
			"want 15, and no maxLength (it counts characters, the limit is bytes)",
			password.MinLength, password.MaxLength)
	}
	descriptions := [][]string{
		{email.Description, "ASCII", "254 bytes", "xn--"},
		{password.Description, "15 characters", "72 bytes", "local part", "4 characters"},
	}
	for _, words := range descriptions {
		for _, w := range words[1:] {
			if !strings.Contains(words[0], w) {
				t.Errorf("description %q does not say %q", words[0], w)
			}
		}
	}
	for name, p := range doc.Components.Schemas["Credentials"].Properties {
		if p.MinLength != 0 || p.MaxLength != 0 || p.Pattern != "" || p.Format == "email" {
			t.Errorf("Credentials %s = %+v; want no rule: login takes any string", name, p)
		}
	}
	pattern := regexp.MustCompile(email.Pattern)
	examples := []map[string]string{doc.Paths["/register"]["post"].RequestBody.Content["application/json"].Example}
	for i := range email.Examples {
		examples = append(examples, map[string]string{"email": email.Examples[i], "password": password.Examples[i]})
	}
	for _, ex := range examples {
		if !pattern.MatchString(ex["email"]) || utf8.RuneCountInString(ex["password"]) < password.MinLength {
			t.Errorf("example %v breaks the document's own rules", ex)
		}
		ts := newTestServer(t, serverConfig{})
		checkJSON(t, ts.register(t, ex["email"], ex["password"]), 201, nil)
		checkJSON(t, ts.login(t, ex["email"], ex["password"]), 200, nil)
	}
}

// TestOpenAPIServed: /openapi.json serves the repository's file, byte for
// byte, as JSON; /docs serves a page that draws it with Swagger UI.
func TestOpenAPIServed(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	want, _ := os.ReadFile("openapi.json")
	w := ts.do(t, request{method: "GET", path: "/openapi.json"})
	if w.Code != 200 || w.Header().Get("Content-Type") != "application/json" || !bytes.Equal(w.Body.Bytes(), want) {
		t.Errorf("/openapi.json = %d %q, %d bytes; want 200, application/json, the file's %d bytes",
			w.Code, w.Header().Get("Content-Type"), w.Body.Len(), len(want))
	}
	w = ts.do(t, request{method: "GET", path: "/docs"})
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
		t.Errorf("/docs = %d %q, want 200 and HTML", w.Code, w.Header().Get("Content-Type"))
	}
	if !strings.Contains(w.Body.String(), `SwaggerUIBundle({url: "/openapi.json"`) {
		t.Errorf("/docs does not draw /openapi.json with Swagger UI:\n%s", w.Body)
	}
}

// TestDocsPinned: /docs loads an exact version of Swagger UI, each file
// with its integrity hash, and its Content-Security-Policy lets no script
// run but those files and the page's inline script, by the SHA-256 this
// test computes.
func TestDocsPinned(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	w := ts.do(t, request{method: "GET", path: "/docs"})
	page := w.Body.String()
	pinned := regexp.MustCompile(`^https://cdn\.jsdelivr\.net/npm/swagger-ui-dist@\d+\.\d+\.\d+/`)
	var files []string
	for _, tag := range regexp.MustCompile(`<(?:script|link)\b[^>]*>`).FindAllString(page, -1) {
		src := regexp.MustCompile(`(?:src|href)="([^"]*)"`).FindStringSubmatch(tag)
		if src == nil {
			continue // the inline script
		}
		files = append(files, src[1])
		if !pinned.MatchString(src[1]) {
			t.Errorf("%s is not an exact version of swagger-ui-dist", src[1])
		}
		if !regexp.MustCompile(`integrity="sha384-[A-Za-z0-9+/]{64}"`).MatchString(tag) || !strings.Contains(tag,
			`crossorigin="anonymous"`) {
			t.Errorf("%s has no integrity hash and crossorigin: %s", src[1], tag)
		}
	}
	if len(files) != 2 {
		t.Fatalf("external files = %q, want Swagger UI's script and style sheet", files)
	}
	inline := regexp.MustCompile(`<script>([^<]*)</script>`).FindStringSubmatch(page)
	if inline == nil {
		t.Fatalf("no inline script in /docs:\n%s", page)
	}
	sum := sha256.Sum256([]byte(inline[1]))
	policy := map[string][]string{}
	for _, d := range strings.Split(w.Header().Get("Content-Security-Policy"), ";") {
		if fields := strings.Fields(d); len(fields) > 0 {
			policy[fields[0]] = fields[1:]
		}
	}
	cdn := pinned.FindString(files[0])
	want := map[string][]string{
		"default-src":     {"'none'"},
		"script-src":      {cdn, "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"},
		"connect-src":     {"'self'"},
		"frame-ancestors": {"'none'"},
	}
	for name, sources := range want {
		if !slices.Equal(policy[name], sources) {
			t.Errorf("Content-Security-Policy %s = %q, want %q", name, policy[name], sources)
		}
	}
	if !slices.Contains(policy["style-src"], cdn) {
		t.Errorf("Content-Security-Policy style-src = %q, want it to hold %s", policy["style-src"], cdn)
	}
}

// TestRoundTrip drives a real HTTP server the way a client would: register,
// log in with the OAuth2 form, and open /users/me with the token.
func TestRoundTrip(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	srv := httptest.NewServer(ts.handler)
	defer srv.Close()

	res, err := http.Post(srv.URL+"/register", "application/json", strings.NewReader(creds(testEmail, testPassword)))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 201 {
		t.Fatalf("register: %d", res.StatusCode)
	}
	res, err = http.PostForm(srv.URL+"/login", url.Values{"grant_type": {"password"}, "username": {testEmail},
		"password": {testPassword}})
	if err != nil {
		t.Fatal(err)
	}
	var tok struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
	}
	err = json.NewDecoder(res.Body).Decode(&tok)
	res.Body.Close()
	if err != nil || res.StatusCode != 200 || tok.TokenType != "bearer" {
		t.Fatalf("login: %d %+v %v", res.StatusCode, tok, err)
	}
	req, _ := http.NewRequest("GET", srv.URL+"/users/me", nil)
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || decode(t, body)["email"] != testEmail {
		t.Errorf("/users/me = %d %s", res.StatusCode, body)
	}
}

// 4. The defenses
//
// Each wrapper is tested alone, around a handler of the test's own, so
// that its test says what it adds; one test of each then runs it in the
// whole server.

// TestWith: with puts the wrappers around a handler, the first outermost.
func TestWith(t *testing.T) {
	var order []string
	wrapper := func(name string) func(http.Handler) http.Handler {
		return func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				order = append(order, name)
				next.ServeHTTP(w, r)
			})
		}
	}
	h := with(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { order = append(order, "handler") }),
		wrapper("a"), wrapper("b"))
	send(h, request{method: "GET", path: "/"})
	if got := strings.Join(order, " "); got != "a b handler" {
		t.Errorf("order = %s, want a b handler", got)
	}
}

// fakeLogin stands for handleLogin behind the wrapper under test: it reads
// the credentials with readCredentials, answers 200 for testPassword and
// 401 for any other, and counts the passwords it checked in *checked.
func fakeLogin(checked *int) http.Handler {
	var mu sync.Mutex
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, password, ok := readCredentials(w, r)
		if !ok {
			return
		}
		mu.Lock()
		*checked++
		mu.Unlock()
		if password != testPassword {
			writeError(w, http.StatusUnauthorized, "Invalid email or password")
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"access_token": "x"})
	})
}

// guess is a JSON login for email from client, with the wrong password
// unless right.
func guess(client, email string, right bool) request {
	password := "a wrong guess"
	if right {
		password = testPassword
	}
	return postJSON("/login", creds(email, password)).from(client)
}

// refuseCrossSite

// TestRefuseCrossSite: a request that a browser marks as coming from
// another site is refused with 403 before its handler runs: no body read,
// no count, no bcrypt. Requests without those headers and same-origin ones
// pass, and an -allow-origin origin is trusted.
func TestRefuseCrossSite(t *testing.T) {
	tests := []struct {
		name    string
		header  map[string]string
		refused bool
	}{
		{"Sec-Fetch-Site cross-site", map[string]string{"Sec-Fetch-Site": "cross-site"}, true},
		{"Sec-Fetch-Site same-site", map[string]string{"Sec-Fetch-Site": "same-site"}, true},
		{"Origin of another host", map[string]string{"Origin": "https://evil.example"}, true},
		{"Sec-Fetch-Site same-origin", map[string]string{"Sec-Fetch-Site": "same-origin"}, false},
		{"Sec-Fetch-Site none (typed by the user)", map[string]string{"Sec-Fetch-Site": "none"}, false},
		{"Origin of this host", map[string]string{"Origin": "http://example.com"}, false},
		{"a trusted origin", map[string]string{"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}, false},
		{"no browser headers, as curl", nil, false},
	}
	for _, tt := range tests {
		checked := 0
		h := with(fakeLogin(&checked), refuseCrossSite(webConfig{allowOrigins: []string{"http://localhost:5173"}}))
		req := guess(testClient, testEmail, true)
		req.header = tt.header
		w, _ := send(h, req)
		if tt.refused {
			checkJSON(t, w, 403, map[string]any{"detail": "Cross-origin request refused"})
		}
		if refused := w.Code == 403 && checked == 0; refused != tt.refused {
			t.Errorf("%s: %d, handler ran %d times; want refused %v", tt.name, w.Code, checked, tt.refused)
		}
		get := request{method: "GET", path: "/", header: tt.header}
		if w, _ := send(h, get); w.Code == 403 {
			t.Errorf("%s: a GET was refused; safe methods pass", tt.name)
		}
	}
}

// TestRefuseCrossSiteServer: in the whole server, cross-site registrations
// and logins, more than the limit of failures, change nothing: the visitor
// is not locked out, and no user is stored.
func TestRefuseCrossSiteServer(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	ts.register(t, testEmail, testPassword)
	crossSite := func(req request) request { return req.withHeader("Sec-Fetch-Site", "cross-site") }
	for range 6 {
		checkDetail(t, ts.do(t, crossSite(guess(testClient, testEmail, false))), 403, "Cross-origin request refused")
	}
	checkDetail(t, ts.do(t, crossSite(postJSON("/register", creds("bob@example.com", testPassword)))), 403)
	checkDetail(t, ts.do(t, crossSite(request{method: "POST", path: "/register", contentType: "text/plain"})), 403)
	token := ts.tokenFor(t, testEmail, testPassword)
	for _, req := range []request{logout(token), changePassword(token, testPassword, "a new and longer passphrase"),
		deleteAccount(token, testPassword)} {
		checkDetail(t, ts.do(t, crossSite(req)), 403, "Cross-origin request refused")
	}
	checkJSON(t, ts.me(t, token), 200, nil)
	if n := len(ts.cfg.limiter.failures.entries); n != 0 {
		t.Errorf("limiter holds %d counts after refused requests, want 0", n)
	}
	if _, found := ts.users.lookup("bob@example.com"); found {
		t.Error("a refused registration was stored")
	}
	checkJSON(t, ts.login(t, testEmail, testPassword), 200, nil)
}

// throttleLogins

// checkThrottled checks a 429 and its Retry-After.
func checkThrottled(t *testing.T, w *httptest.ResponseRecorder, retryAfter string) {
	t.Helper()
	checkJSON(t, w, http.StatusTooManyRequests,
		map[string]any{"detail": "Too many failed login attempts, try again later"})
	checkHeaders(t, w, "Retry-After", retryAfter)
}

// throttled returns fakeLogin inside throttleLogins with the given limits
// (0 for none), the limiter, and its clock.
func throttled(perAccount, perAddress, perEmail int, checked *int) (http.Handler, *loginLimiter, *fakeClock) {
	clock := newFakeClock()
	l := newLoginLimiter(perAccount, perAddress, perEmail, clock.now)
	return with(fakeLogin(checked), throttleLogins(l)), l, clock
}

// TestThrottlePerAccount: five failures for one address and email, then
// 429s for that pair only, the right password included and its handler
// never run, until the window closes.
func TestThrottlePerAccount(t *testing.T) {
	checked := 0
	h, _, clock := throttled(5, 100, 100, &checked)
	const attacker = "198.51.100.7"
	for range 5 {
		if w, _ := send(h, guess(attacker, testEmail, false)); w.Code != 401 {
			t.Fatalf("guess: %d, want 401", w.Code)
		}
		clock.advance(10 * time.Second)
	}
	// The window opened at the first failure, 50 s ago: 850 s are left.
	for _, req := range []request{guess(attacker, testEmail, false), guess(attacker, testEmail, true), guess(attacker,
		"  ANN@Example.com", true)} {
		w, _ := send(h, req)
		checkThrottled(t, w, "850")
	}
	clock.advance(1500 * time.Millisecond)
	w, _ := send(h, guess(attacker, testEmail, true))
	checkThrottled(t, w, "849") // 848.5 s, rounded up
	if checked != 5 {
		t.Errorf("the handler checked %d passwords, want 5: a 429 runs no bcrypt", checked)
	}
	// The same email from another address, and other emails from this one,
	// are not throttled.
	for _, req := range []request{guess("203.0.113.9", testEmail, false), guess(attacker, "other@example.com", false)} {
		if w, _ := send(h, req); w.Code != 401 {
			t.Errorf("%s from %s: %d, want 401", req.body, req.client, w.Code)
		}
	}
	clock.advance(848*time.Second + 500*time.Millisecond) // the window closes
	if w, _ := send(h, guess(attacker, testEmail, true)); w.Code != 200 {
		t.Errorf("after the window: %d, want 200", w.Code)
	}
}

// TestThrottleSuccessClearsCount: four failures and a success leave room
// for five more failures.
func TestThrottleSuccessClearsCount(t *testing.T) {
	checked := 0
	h, _, _ := throttled(5, 100, 100, &checked)
	var codes []int
	for _, right := range []bool{false, false, false, false, true, false, false, false, false, false, true} {
		w, _ := send(h, guess(testClient, testEmail, right))
		codes = append(codes, w.Code)
	}
	if want := []int{401, 401, 401, 401, 200, 401, 401, 401, 401, 401, 429}; !slices.Equal(codes, want) {
		t.Errorf("statuses = %v, want %v", codes, want)
	}
}

// TestThrottleOwnAccount reads the throttle as an attacker with an account
// of their own, who logs into it between guesses: that must neither reset
// the count of the account under attack, nor the count of their address.
func TestThrottleOwnAccount(t *testing.T) {
	checked := 0
	h, _, _ := throttled(3, 10, 100, &checked)
	status := func(email string, right bool) int { w, _ := send(h, guess(testClient, email, right)); return w.Code }
	for range 3 {
		status(testEmail, false)
		if got := status("mallory@example.com", true); got != 200 {
			t.Fatalf("own login: %d", got)
		}
	}
	if got := status(testEmail, false); got != 429 {
		t.Errorf("the account under attack after 3 failures and own logins: %d, want 429", got)
	}
	for i := range 6 { // 9 failures so far, spread so that no account reaches 3
		status(fmt.Sprintf("victim%d@example.com", i), false)
		status("mallory@example.com", true)
	}
	if got := status("victim6@example.com", false); got != 401 {
		t.Errorf("the 10th failure: %d, want 401", got)
	}
	if a, b := status("victim9@example.com", false), status("mallory@example.com", true); a != 429 || b != 429 {
		t.Errorf("after 10 failures from the address: %d and own login %d, want 429 and 429", a, b)
	}
}

// TestThrottlePerAddress: 100 failures from one address, spread over many
// emails, throttle every email from that address, and no other address.
func TestThrottlePerAddress(t *testing.T) {
	checked := 0
	h, _, clock := throttled(5, 100, 100, &checked)
	const attacker = "2001:db8::1"
	for i := range 100 {
		send(h, guess(attacker, fmt.Sprintf("user%d@example.com", i), false))
	}
	for _, email := range []string{testEmail, "user999@example.com"} {
		w, _ := send(h, guess(attacker, email, true))
		checkThrottled(t, w, "900")
	}
	if w, _ := send(h, guess("192.0.2.200", testEmail, true)); w.Code != 200 {
		t.Errorf("another address: %d, want 200", w.Code)
	}
	clock.advance(failureWindow)
	if w, _ := send(h, guess(attacker, testEmail, true)); w.Code != 200 {
		t.Errorf("after the window: %d, want 200", w.Code)
	}
}

// TestThrottleProxyHeadersIgnored: a client cannot pick its counted
// address with X-Forwarded-For.
func TestThrottleProxyHeadersIgnored(t *testing.T) {
	checked := 0
	h, _, _ := throttled(5, 100, 100, &checked)
	for i := range 6 {
		req := guess(testClient, testEmail, false).withHeader("X-Forwarded-For", fmt.Sprintf("10.0.0.%d", i))
		req = req.withHeader("X-Real-IP", fmt.Sprintf("10.0.0.%d", i))
		want := 401
		if i == 5 {
			want = 429
		}
		if w, _ := send(h, req); w.Code != want {
			t.Errorf("attempt %d: status = %d, want %d", i+1, w.Code, want)
		}
	}
}

// TestThrottleConcurrentGuesses: 20 guesses at once for one account reach
// the handler five times, not twenty: an attempt is counted before it runs.
func TestThrottleConcurrentGuesses(t *testing.T) {
	checked := 0
	h, _, _ := throttled(5, 100, 100, &checked)
	codes := make(chan int, 20)
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() { w, _ := send(h, guess(testClient, testEmail, false)); codes <- w.Code })
	}
	wg.Wait()
	close(codes)
	count := map[int]int{}
	for c := range codes {
		count[c]++
	}
	if count[401] != 5 || count[429] != 15 || checked != 5 {
		t.Errorf("statuses = %v, %d checked; want five 401s and fifteen 429s", count, checked)
	}
}

// TestThrottleNotCounted: a request whose body the login's reader refuses
// is passed on uncounted, and an attempt its handler answers otherwise
// than 200 or 401, here a busy CPU's 503, is taken back.
func TestThrottleNotCounted(t *testing.T) {
	clock := newFakeClock()
	l := newLoginLimiter(1, 100, 100, clock.now)
	checked := 0
	h := with(fakeLogin(&checked), throttleLogins(l))
	for _, req := range []request{
		postForm("/login", "username=ann%40example.com&password=%FF%FE"),
		postJSON("/login", `{"email":"ann@example.com","email":"x"}`),
		guess(testClient, testEmail, true).withHeader("Content-Type", "text/plain"),
	} {
		if w, _ := send(h, req); w.Code/100 != 4 || checked != 0 {
			t.Errorf("%q: %d, %d checked; want the reader's 4xx", req.body, w.Code, checked)
		}
	}
	busy := with(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { writeBusy(w) }), throttleLogins(l))
	send(busy, guess(testClient, testEmail, false))
	if n := len(l.failures.entries); n != 0 {
		t.Errorf("limiter holds %d counts, want 0", n)
	}
	send(h, guess(testClient, testEmail, false))
	if w, _ := send(h, guess(testClient, testEmail, true)); w.Code != 429 {
		t.Errorf("after one failure with a limit of 1: %d, want 429", w.Code)
	}
}

// TestClientAddr: the client an address counts as: an IPv4 address as
// itself, an IPv6 address as its /64, an IPv4 address mapped into IPv6 as
// the IPv4 address.
func TestClientAddr(t *testing.T) {
	for remote, want := range map[string]string{
		"192.0.2.1:40000":              "192.0.2.1",
		"[2001:db8:1:2:3:4:5:6]:40000": "2001:db8:1:2::/64",
		"[2001:db8:1:2:ffff::1]:1":     "2001:db8:1:2::/64",
		"[2001:db8:1:3::1]:1":          "2001:db8:1:3::/64",
		"[::ffff:192.0.2.1]:40000":     "192.0.2.1",
		"[fe80::1%eth0]:40000":         "fe80::/64",
		"[::1]:8080":                   "::/64",
		"not an address":               "not an address",
	} {
		if got := clientAddr(remote); got != want {
			t.Errorf("clientAddr(%q) = %q, want %q", remote, got, want)
		}
	}
}

// TestThrottleIPv6Network: the addresses of one IPv6 /64 share their
// counts, as one host rotating through them would; another /64 does not.
func TestThrottleIPv6Network(t *testing.T) {
	checked := 0
	h, _, _ := throttled(5, 100, 100, &checked)
	for i := range 5 {
		send(h, guess(fmt.Sprintf("2001:db8:1:2::%x", i+1), testEmail, false))
	}
	w, _ := send(h, guess("2001:db8:1:2:ffff:ffff:ffff:ffff", testEmail, true))
	checkThrottled(t, w, "900")
	if w, _ := send(h, guess("2001:db8:1:3::1", testEmail, true)); w.Code != 200 {
		t.Errorf("another /64: %d, want 200", w.Code)
	}
}

// TestThrottlePerEmail: one email takes at most 100 failed logins in the
// window from all addresses (NIST SP 800-63B-4 section 3.2.2): the 101st,
// from the 21st address, is refused, while an address that logged in as
// that email within the window still logs in, and no other email is
// throttled. Once the window closes, every address may try again.
func TestThrottlePerEmail(t *testing.T) {
	checked := 0
	h, l, clock := throttled(5, 100, 100, &checked)
	const owner = "203.0.113.1"
	if w, _ := send(h, guess(owner, testEmail, true)); w.Code != 200 {
		t.Fatalf("the owner's login: %d", w.Code)
	}
	for a := range 20 {
		for range 5 {
			send(h, guess(fmt.Sprintf("198.51.100.%d", a+1), testEmail, false))
		}
	}
	w, _ := send(h, guess("198.51.100.21", testEmail, true))
	checkThrottled(t, w, "900")
	if w, _ := send(h, guess("198.51.100.21", "bob@example.com", false)); w.Code != 401 {
		t.Errorf("another email from the 21st address: %d, want 401", w.Code)
	}
	for _, right := range []bool{false, true} { // the owner, even after a typo
		if w, _ := send(h, guess(owner, testEmail, right)); w.Code != map[bool]int{false: 401, true: 200}[right] {
			t.Errorf("the owner's address, right password %v: %d", right, w.Code)
		}
	}
	if checked != 104 {
		t.Errorf("the handler checked %d passwords, want 104: the owner's 3, 100 guesses and bob's", checked)
	}
	clock.advance(failureWindow)
	if w, _ := send(h, guess("198.51.100.21", testEmail, true)); w.Code != 200 {
		t.Errorf("after the window: %d, want 200", w.Code)
	}
	if n := len(l.trusted.entries); n != 1 {
		t.Errorf("%d trusted addresses, want 1: the 21st; the owner's expired with the window", n)
	}
}

// TestLimiterTrustedBounded: the trusted addresses are a table of their
// own, bounded as the counts are: a flood of failures never pushes the
// owner's address out of it.
func TestLimiterTrustedBounded(t *testing.T) {
	clock := newFakeClock()
	l := newLoginLimiter(5, 100, 100, clock.now)
	l.begin("203.0.113.1", testEmail)
	l.succeeded("203.0.113.1", testEmail)
	for i := range maxLimiterEntries {
		l.begin(fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255), fmt.Sprintf("flood%d@example.com", i))
	}
	if len(l.failures.entries) != maxLimiterEntries || len(l.trusted.entries) != 1 {
		t.Errorf("%d counts, %d trusted; want %d and the owner's 1", len(l.failures.entries), len(l.trusted.entries),
			maxLimiterEntries)
	}
	for i := range maxLimiterEntries + 1 {
		l.succeeded(fmt.Sprint("10.0.0.", i), testEmail)
	}
	if len(l.trusted.entries) != maxLimiterEntries {
		t.Errorf("%d trusted after a flood of successes, want the bound %d", len(l.trusted.entries), maxLimiterEntries)
	}
}

// TestThrottleConfirmations: a wrong password confirmation of an account's
// own routes (a 400) counts as a failed login of the request's user from
// its address: a stolen token cannot guess the password. The sixth in the
// window is a 429 whose handler never runs; a right one clears the count.
func TestThrottleConfirmations(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	checked := 0
	confirm := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Password *string `json:"password"`
		}
		if !readJSON(w, r, &body) || !required(w, "password", body.Password) {
			return
		}
		checked++
		if *body.Password != testPassword {
			writeError(w, http.StatusBadRequest, "Incorrect password")
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	h := with(confirm, requireUser(ts.users, ts.cfg.secret, ts.cfg.now), throttleConfirmations(ts.cfg.limiter))
	var codes []int
	for _, password := range []string{"a", "b", "c", "d", testPassword, "e", "f", "g", "h", "i", testPassword} {
		w, _ := send(h, deleteAccount(token, password))
		codes = append(codes, w.Code)
	}
	if want := []int{400, 400, 400, 400, 204, 400, 400, 400, 400, 400, 429}; !slices.Equal(codes, want) || checked != 10 {
		t.Errorf("statuses = %v, %d checked; want %v, 10", codes, checked, want)
	}
	send(h, deleteAccount(token, "x").withHeader("Content-Type", "text/plain")) // refused before any check: not counted
	if w, _ := send(h, deleteAccount(token, testPassword).from("192.0.2.99")); w.Code != 204 {
		t.Errorf("from another address: %d, want 204", w.Code)
	}
}

// TestThrottleConfirmationsServer: in the whole server, wrong passwords
// given to DELETE /users/me and PUT /users/me/password and to /login share
// one count: the sixth is a 429, at every one of them.
func TestThrottleConfirmationsServer(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	for _, req := range []request{deleteAccount(token, "a"), changePassword(token, "b", "a new and longer passphrase"),
		deleteAccount(token, "c")} {
		checkJSON(t, ts.do(t, req), 400, map[string]any{"detail": "Incorrect password"})
	}
	checkJSON(t, ts.login(t, testEmail, "d"), 401, nil)
	checkJSON(t, ts.do(t, deleteAccount(token, "e")), 400, nil)
	checkThrottled(t, ts.do(t, changePassword(token, testPassword, "a new and longer passphrase")), "900")
	checkThrottled(t, ts.do(t, deleteAccount(token, testPassword)), "900")
	checkThrottled(t, ts.login(t, testEmail, testPassword), "900")
	checkJSON(t, ts.me(t, token), 200, nil)
}

// TestThrottleOff: a limit of 0 turns that limit off. Each case fails more
// often than the limit it turns off would allow, spread over emails so
// that the limits left on are not reached.
func TestThrottleOff(t *testing.T) {
	tests := []struct {
		name                             string
		perAccount, perAddress, perEmail int
		failures, emails                 int  // failures, spread over this many emails
		wantThrottled                    bool // is the next attempt throttled?
	}{
		{"all on, control", 3, 10, 4, 3, 1, true},
		{"per account off", 0, 10, 6, 5, 1, false},
		{"per address off", 3, 0, 4, 12, 12, false},
		{"per email off", 0, 10, 0, 5, 1, false},
		{"all off", 0, 0, 0, 12, 1, false},
	}
	for _, tt := range tests {
		checked := 0
		h, l, _ := throttled(tt.perAccount, tt.perAddress, tt.perEmail, &checked)
		for i := range tt.failures {
			send(h, guess(testClient, fmt.Sprintf("user%d@example.com", i%tt.emails), false))
		}
		w, _ := send(h, guess(testClient, "user0@example.com", false))
		if got := w.Code == 429; got != tt.wantThrottled {
			t.Errorf("%s: throttled after %d failures = %v, want %v", tt.name, tt.failures, got, tt.wantThrottled)
		}
		send(h, guess(testClient, "user1@example.com", true))
		if tt.perEmail == 0 && len(l.trusted.entries) != 0 {
			t.Errorf("%s: %d clients trusted with no limit per email", tt.name, len(l.trusted.entries))
		}
		if tt.perAccount+tt.perAddress+tt.perEmail == 0 && len(l.failures.entries) != 0 {
			t.Errorf("limiter holds %d counts with every limit off", len(l.failures.entries))
		}
	}
}

// TestThrottleServer: in the whole server, a registered and an unknown
// email are throttled alike after five failures, and a throttled login is
// refused at once even while every CPU is busy: it never waits for one.
func TestThrottleServer(t *testing.T) {
	ts := newTestServer(t, serverConfig{cpus: 1, maxCPUWait: 5 * time.Second})
	ts.register(t, testEmail, testPassword)
	for _, email := range []string{testEmail, "nobody@example.com"} {
		for range 5 {
			checkJSON(t, ts.login(t, email, "guess"), 401, nil)
		}
	}
	defer holdCPUs(t, ts, 1)()
	start := time.Now()
	checkThrottled(t, ts.login(t, testEmail, testPassword), "900")
	checkThrottled(t, ts.login(t, "nobody@example.com", testPassword), "900")
	if waited := time.Since(start); waited > time.Second {
		t.Errorf("throttled logins took %v: they waited for a CPU", waited)
	}
}

// TestLimiterBounded floods the limiter with distinct keys: it never holds
// more than maxLimiterEntries, expired counts go first, then the oldest.
func TestLimiterBounded(t *testing.T) {
	clock := newFakeClock()
	l := newLoginLimiter(5, 100, 0, clock.now)
	check := func(when string) {
		t.Helper()
		if len(l.failures.entries) > maxLimiterEntries || l.failures.byAge.Len() != len(l.failures.entries) {
			t.Fatalf("%s: %d counts, %d in age order; want at most %d, equal", when, len(l.failures.entries),
				l.failures.byAge.Len(), maxLimiterEntries)
		}
	}
	// 1,000 counts that will expire, from one address.
	for i := range 1000 {
		l.begin("198.51.100.7", fmt.Sprintf("old%d@example.com", i))
	}
	clock.advance(failureWindow)
	l.begin("198.51.100.8", "first-new@example.com")
	if _, kept := l.failures.entries[limiterKey{addr: "198.51.100.7"}]; kept || len(l.failures.entries) != 2 {
		t.Errorf("expired counts kept: %d counts", len(l.failures.entries))
	}
	// A flood of distinct addresses and emails, twice the bound.
	for i := range maxLimiterEntries {
		l.begin(fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255), fmt.Sprintf("flood%d@example.com", i))
		if i%10_000 == 0 {
			check(fmt.Sprint("flood ", i))
		}
	}
	check("after the flood")
	if len(l.failures.entries) != maxLimiterEntries {
		t.Errorf("%d counts after the flood, want the bound %d", len(l.failures.entries), maxLimiterEntries)
	}
	if first, _, _ := limiterKeys("198.51.100.8", "first-new@example.com"); l.failures.entries[first] != nil {
		t.Error("the oldest count was kept over newer ones")
	}
	last := maxLimiterEntries - 1
	if _, newest, _ := limiterKeys(fmt.Sprintf("10.%d.%d.%d", last>>16, last>>8&255, last&255),
		""); l.failures.entries[newest] == nil {
		t.Error("the newest count was dropped")
	}
}

// waitForCPU

// holdCPUs takes n bcrypt slots of ts, as n logins under way would, and
// returns a function that gives them back.
func holdCPUs(t *testing.T, ts *testServer, n int) (release func()) {
	t.Helper()
	for range n {
		if err := ts.cfg.cpus.acquire(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return func() {
		for range n {
			ts.cfg.cpus.release()
		}
	}
}

// TestCPUSlots: as many bcrypt runs at once as the Go scheduler uses CPUs,
// one change of the users file at a time, and a wait of 2 seconds for the
// others.
func TestCPUSlots(t *testing.T) {
	c := newCPUSlots()
	if cap(c.held) != runtime.GOMAXPROCS(0) || c.maxWait != 2*time.Second {
		t.Errorf("newCPUSlots() = %d slots, a wait of %v; want GOMAXPROCS (%d), 2s", cap(c.held), c.maxWait,
			runtime.GOMAXPROCS(0))
	}
	if c := newChangeSlots(); cap(c.held) != 1 || c.maxWait != 2*time.Second {
		t.Errorf("newChangeSlots() = %d slots, a wait of %v; want 1, 2s", cap(c.held), c.maxWait)
	}
}

// TestOneChangeAtATime: in the whole server, registrations, password
// changes and deletions take turns, and one waiting for its turn holds no
// CPU slot, which logins then have; one that waits in vain is a 503 that
// changes nothing.
func TestOneChangeAtATime(t *testing.T) {
	ts := newTestServer(t, serverConfig{cpus: 1})
	token := ts.token(t)
	ts.cfg.changes.maxWait = 20 * time.Millisecond
	ts.cfg.changes.acquire(context.Background()) // a change under way
	for _, req := range []request{postJSON("/register", creds("bob@example.com", testPassword)),
		changePassword(token, testPassword, "a new and longer passphrase"), deleteAccount(token, testPassword)} {
		checkDetail(t, ts.do(t, req), 503, "Server busy")
	}
	ts.cfg.changes.maxWait = 10 * time.Second
	done := make(chan int)
	go func() { done <- ts.register(t, "bob@example.com", testPassword).Code }()
	time.Sleep(20 * time.Millisecond) // the registration waits for its turn
	checkJSON(t, ts.login(t, testEmail, testPassword), 200, nil)
	ts.cfg.changes.release()
	if code := <-done; code != 201 {
		t.Errorf("the registration that waited its turn: %d, want 201", code)
	}
}

// TestWaitForCPU: the handler runs in a slot; while every slot is taken, a
// request waits, runs if one comes free in time, and otherwise answers 503
// with Retry-After: 1 without running. A client that gives up stops
// waiting at once. The body is read before the wait, so a client slow to
// send it holds no slot.
func TestWaitForCPU(t *testing.T) {
	cpus := &slots{held: make(chan struct{}, 1), maxWait: 20 * time.Millisecond}
	held := -1
	h := with(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		held = len(cpus.held)
		w.WriteHeader(http.StatusNoContent)
	}), waitForCPU(cpus))
	if w, _ := send(h, request{method: "POST", path: "/"}); w.Code != 204 || held != 1 {
		t.Errorf("free: %d, %d slots held while the handler ran; want 204, 1", w.Code, held)
	}
	cpus.acquire(context.Background())
	held = -1
	w, _ := send(h, request{method: "POST", path: "/"})
	checkJSON(t, w, 503, map[string]any{"detail": "Server busy, try again later"})
	checkHeaders(t, w, "Retry-After", "1")
	if held != -1 {
		t.Error("the handler ran without a slot")
	}
	cpus.maxWait = 10 * time.Second
	time.AfterFunc(20*time.Millisecond, cpus.release)
	if w, _ := send(h, request{method: "POST", path: "/"}); w.Code != 204 {
		t.Errorf("a slot freed within the wait: %d, want 204", w.Code)
	}

	cpus.acquire(context.Background())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/", nil).WithContext(ctx))
	if rec.Code != 503 || time.Since(start) > time.Second {
		t.Errorf("a client gone: %d after %v, want 503 at once", rec.Code, time.Since(start))
	}
	cpus.release()

	body, send := io.Pipe()
	done := make(chan int)
	go func() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/", body))
		done <- rec.Code
	}()
	time.Sleep(20 * time.Millisecond)
	if n := len(cpus.held); n != 0 {
		t.Errorf("%d slots held while the body was still on its way, want 0", n)
	}
	io.WriteString(send, "the body")
	send.Close()
	if code := <-done; code != 204 {
		t.Errorf("slow body: %d, want 204", code)
	}
}

// TestWaitForCPUServer: in the whole server, with every CPU busy, logins
// and registrations answer 503, are not counted as failures, and change
// nothing; once a CPU is free they work.
func TestWaitForCPUServer(t *testing.T) {
	ts := newTestServer(t, serverConfig{cpus: 2, maxCPUWait: 10 * time.Millisecond})
	ts.register(t, testEmail, testPassword)
	release := holdCPUs(t, ts, 2)
	busy := []request{
		guess(testClient, testEmail, true),
		postForm("/login", formCreds(testEmail, "guess")),
		postJSON("/register", creds("bob@example.com", testPassword)),
	}
	for range 5 { // as many wrong passwords as the limit allows
		busy = append(busy, guess(testClient, testEmail, false))
	}
	for _, req := range busy {
		checkDetail(t, ts.do(t, req), 503, "Server busy")
	}
	if n := len(ts.cfg.limiter.failures.entries); n != 0 {
		t.Errorf("limiter holds %d counts after 503s, want 0", n)
	}
	if _, found := ts.users.lookup("bob@example.com"); found {
		t.Error("a registration answered 503 was stored")
	}
	release()
	for range 5 {
		checkJSON(t, ts.login(t, testEmail, "guess"), 401, nil)
	}
	checkThrottled(t, ts.login(t, testEmail, testPassword), "900")
	checkJSON(t, ts.register(t, "bob@example.com", testPassword), 201, nil)
}

// equalFailureTime

// TestCompareAgain: after a failed comparison at cost c, compareAgain does
// as much work again as makes one comparison at the costliest cost: at a
// cost 3 steps cheaper, 7 comparisons more, so the failure takes about as
// long as a comparison at the costliest cost; at that cost, none. Each is
// timed against a comparison at the costliest cost, so a slow machine
// slows both alike.
func TestCompareAgain(t *testing.T) {
	const costliest = bcrypt.MinCost + 3
	cheap, costly := mustHash(t, testPassword, bcrypt.MinCost), mustHash(t, testPassword, costliest)
	one := fastest(func() { verifyPassword("wrong", costly) })
	padded := fastest(func() { verifyPassword("wrong", cheap); compareAgain("wrong", cheap, costliest) })
	none := fastest(func() { compareAgain("wrong", costly, costliest) })
	if padded < one/2 || none > one/4 {
		t.Errorf("one comparison at cost %d takes %v; a cheap one padded %v, want about as long; "+
			"at the costliest cost, padding %v, want none", costliest, one, padded, none)
	}
}

// TestComparisons: how many comparisons at a cost make one at the
// costliest, with bcrypt's round to begin counted.
func TestComparisons(t *testing.T) {
	for _, tt := range []struct{ cost, costliest, want int }{{12, 12, 1}, {10, 12, 4}, {8, 12, 16}, {6, 12, 63}, {4, 12,
		241}, {4, 6, 4}} {
		if got := comparisons(tt.cost, tt.costliest); got != tt.want {
			t.Errorf("comparisons(%d, %d) = %d, want %d", tt.cost, tt.costliest, got, tt.want)
		}
	}
}

// TestEqualFailureTime: a login answered 401 is padded with compareAgain,
// against the hash it was compared with (the user's, or for an unknown
// email the dummy); a success, a refused body or another answer is not.
// Timed against the whole server's own logins, as TestCompareAgain.
func TestEqualFailureTime(t *testing.T) {
	const costliest = bcrypt.MinCost + 3
	cheap := mustHash(t, testPassword, bcrypt.MinCost)
	path := writeUsers(t, User{ID: 1, Email: testEmail, PasswordHash: cheap},
		User{ID: 2, Email: "costly@example.com", PasswordHash: mustHash(t, testPassword, costliest)})
	ts := newTestServer(t, serverConfig{usersPath: path, maxPerAccount: noLimit, maxPerAddress: noLimit})
	login := handleLogin(ts.users, ts.cfg.dummyHash, ts.cfg.secret, ts.cfg.now)
	h := with(login, equalFailureTime(ts.users, ts.cfg.dummyHash, costliest))
	timed := func(req request, status int) time.Duration {
		return fastest(func() {
			if w, _ := send(h, req); w.Code != status {
				t.Fatalf("%s: %d, want %d", req.body, w.Code, status)
			}
		})
	}
	costly := timed(guess(testClient, "costly@example.com", false), 401)
	for _, req := range []request{guess(testClient, testEmail, false), guess(testClient, "nobody@example.com", false),
		postForm("/login", formCreds(testEmail, "wrong"))} {
		if took := timed(req, 401); took < costly/2 {
			t.Errorf("%s: %v, want about as long as a failure at the costliest cost, %v", req.body, took, costly)
		}
	}
	if took := timed(guess(testClient, testEmail, true), 200); took > costly/4 {
		t.Errorf("a success took %v, want no padding (a failure at the costliest cost: %v)", took, costly)
	}
}

// rehashCheapHashes

// TestRehashCheapHashes: after a login answered 200 for a user whose hash
// is cheaper than the server's cost, the user's hash is a new one of that
// password at the server's cost, in the file too; a hash at or above it is
// kept, and a failure changes nothing. If the new hash cannot be written,
// the answer stands, the old hash stays, and the log says so.
func TestRehashCheapHashes(t *testing.T) {
	cheap, costly := mustHash(t, testPassword, bcrypt.MinCost), mustHash(t, testPassword, bcrypt.MinCost+2)
	path := writeUsers(t, User{ID: 1, Email: "cheap@example.com", PasswordHash: cheap},
		User{ID: 2, Email: "costly@example.com", PasswordHash: costly}, User{ID: 3, Email: "cheap2@example.com",
			PasswordHash: cheap})
	var log syncBuffer
	users, _ := openStore(path, discardLog)
	checked := 0
	h := with(fakeLogin(&checked), rehashCheapHashes(slog.New(slog.NewTextHandler(&log, nil)), users, bcrypt.MinCost+1))
	stored := func(email string) string {
		for _, u := range readStoreFile(t, path).Users {
			if u.Email == email {
				return u.PasswordHash
			}
		}
		return ""
	}
	send(h, guess(testClient, "cheap@example.com", false))
	if stored("cheap@example.com") != cheap {
		t.Error("a failed login rehashed")
	}
	if w, _ := send(h, guess(testClient, "cheap@example.com", true)); w.Code != 200 {
		t.Fatalf("login: %d", w.Code)
	}
	rehashed := stored("cheap@example.com")
	if hashCost(rehashed) != bcrypt.MinCost+1 || !verifyPassword(testPassword, rehashed) {
		t.Errorf("after one login, the cheap hash has cost %d (matching: %v); want the server's %d",
			hashCost(rehashed), verifyPassword(testPassword, rehashed), bcrypt.MinCost+1)
	}
	if u, _ := users.lookup("cheap@example.com"); u.PasswordHash != rehashed {
		t.Error("memory does not hold the file's new hash")
	}
	send(h, guess(testClient, "cheap@example.com", true))
	send(h, guess(testClient, "costly@example.com", true))
	if stored("cheap@example.com") != rehashed || stored("costly@example.com") != costly {
		t.Error("a hash at or above the server's cost was hashed again")
	}

	if log.String() != "" {
		t.Errorf("rehashes that were written logged:\n%s", log.String())
	}
	os.Chtimes(path, time.Now(), time.Now().Add(time.Second)) // a hand edit: nothing may be written now
	if w, _ := send(h, guess(testClient, "cheap2@example.com", true)); w.Code != 200 {
		t.Errorf("a login whose rehash failed: %d, want 200", w.Code)
	}
	if stored("cheap2@example.com") != cheap || !strings.Contains(log.String(), "not rehashed") {
		t.Errorf("a rehash that could not be written: file holds %q; log:\n%s", stored("cheap2@example.com"), log.String())
	}
}

// logRequests

// TestLogRequests checks the request log: one line per request with
// method, path, status and duration, and never a password, hash or token.
func TestLogRequests(t *testing.T) {
	var buf bytes.Buffer
	ts := newTestServer(t, serverConfig{logger: slog.New(slog.NewTextHandler(&buf, nil))})
	token := ts.token(t)
	ts.me(t, token)
	ts.login(t, testEmail, "a wrong password")
	ts.do(t, postForm("/login", "username=ann%40example.com&password=form+password").from("2001:db8:1:2::3"))

	log := buf.String()
	u, _ := ts.users.lookup(testEmail)
	for _, secret := range []string{testPassword, "a wrong password", "form password", "form+password", u.PasswordHash,
		token, testSecret} {
		if strings.Contains(log, secret) {
			t.Errorf("log holds %q:\n%s", secret, log)
		}
	}
	lines := strings.Split(strings.TrimSpace(log), "\n")
	if len(lines) != 5 {
		t.Errorf("log has %d lines, want one for each of 5 requests:\n%s", len(lines), log)
	}
	line := regexp.MustCompile(`method=(GET|POST) path=/\S+ status=(200|201|401) duration=\S+ ` +
		`client=(192\.0\.2\.1|2001:db8:1:2::/64)$`)
	for _, l := range lines {
		if !line.MatchString(l) {
			t.Errorf("log line %q lacks method, path, status or duration", l)
		}
	}
}

// commonHeaders

// TestCommonHeaders checks nosniff and the refusal to be framed on every
// response, the mux's own 404 and 405 and the refusals of other sites,
// busy CPUs and throttling included, and that every one is JSON but the
// /docs page.
func TestCommonHeaders(t *testing.T) {
	ts := newTestServer(t, serverConfig{maxPerAccount: 1, cpus: 1, maxCPUWait: time.Millisecond})
	token := ts.token(t)
	tests := []struct {
		req    request
		status int
	}{
		{request{method: "GET", path: "/healthz"}, 200},
		{postJSON("/register", creds("bob@example.com", testPassword)), 201},
		{request{method: "POST", path: "/register", contentType: "text/plain"}, 415},
		{guess(testClient, testEmail, true), 200},
		{bearer(request{method: "GET", path: "/users/me"}, token), 200},
		{request{method: "GET", path: "/users/me"}, 401},
		{request{method: "GET", path: "/nowhere"}, 404},
		{request{method: "GET", path: "/login"}, 405},
		{request{method: "GET", path: "/openapi.json"}, 200},
		{request{method: "GET", path: "/docs"}, 200},
		{guess(testClient, testEmail, false).withHeader("Sec-Fetch-Site", "cross-site"), 403},
		{guess(testClient, testEmail, false), 401},
		{guess(testClient, testEmail, false), 429},
	}
	for _, tt := range tests {
		w := ts.do(t, tt.req)
		if w.Code != tt.status {
			t.Errorf("%s %s: status = %d, want %d", tt.req.method, tt.req.path, w.Code, tt.status)
		}
		checkHeaders(t, w, "X-Content-Type-Options", "nosniff", "X-Frame-Options", "DENY")
		if json := w.Header().Get("Content-Type") == "application/json"; json != (tt.req.path != "/docs") {
			t.Errorf("%s %s: Content-Type = %q", tt.req.method, tt.req.path, w.Header().Get("Content-Type"))
		}
	}
	defer holdCPUs(t, ts, 1)()
	w := ts.do(t, guess(testClient, "bob@example.com", true))
	checkHeaders(t, w, "X-Content-Type-Options", "nosniff", "X-Frame-Options", "DENY")
}

// checkHost

// TestCheckHost: a server listening on loopback answers 400 to a request
// whose Host is another name, before its handler runs. Loopback names,
// with any port, and -allow-host names pass. A server listening elsewhere
// takes any Host.
func TestCheckHost(t *testing.T) {
	ran := 0
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { ran++ })
	h := with(ok, checkHost(webConfig{checkHost: true, allowHosts: []string{"myhost.test"}}))
	passes := []string{"localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8080", "127.9.8.7:80",
		"[::1]:8080", "[::1]", "myhost.test", "MyHost.test:8443"}
	for _, host := range passes {
		if w, _ := send(h, request{method: "GET", path: "/", header: map[string]string{"Host": host}}); w.Code != 200 {
			t.Errorf("Host %s: status %d, want 200", host, w.Code)
		}
	}
	for _, host := range []string{"example.com", "localhost.evil.test", "127.0.0.1.nip.io", "10.0.0.1:8080", "",
		"myhost.test.evil"} {
		w, _ := send(h, request{method: "GET", path: "/", header: map[string]string{"Host": host}})
		checkJSON(t, w, 400, map[string]any{"detail": "Invalid host header"})
	}
	if ran != len(passes) {
		t.Errorf("the handler ran %d times, want %d: only for the names that pass", ran, len(passes))
	}
	open := with(ok, checkHost(webConfig{}))
	if w, _ := send(open, request{method: "GET", path: "/",
		header: map[string]string{"Host": "rebind.evil.test"}}); w.Code != 200 {
		t.Errorf("a server not on loopback: Host rebind.evil.test: status %d, want 200", w.Code)
	}
}

// TestCheckHostServer: in the whole server, a rebound page's requests get
// the 400 on every route, even its preflights, before CORS answers: no
// count, no user. The developer's own login still works.
func TestCheckHostServer(t *testing.T) {
	ts := newTestServer(t, serverConfig{web: webConfig{checkHost: true, allowOrigins: []string{frontEnd}}})
	local := map[string]string{"Host": "localhost:8080"}
	checkJSON(t, ts.do(t, postJSON("/register", creds(testEmail, testPassword)).withHeader("Host", "localhost:8080")),
		201, nil)
	rebound := func(req request) request {
		req.header = map[string]string{"Host": "rebind.evil.test:8080", "Origin": "http://rebind.evil.test:8080",
			"Sec-Fetch-Site": "same-origin"}
		return req
	}
	for range 6 {
		checkDetail(t, ts.do(t, rebound(guess(testClient, testEmail, false))), 400, "Invalid host header")
	}
	for _, route := range append(routes, "OPTIONS /login") {
		method, path, _ := strings.Cut(route, " ")
		req := rebound(postJSON(path, creds("rebound@example.com", testPassword)))
		req.method = method
		req.header["Origin"] = frontEnd
		w := ts.do(t, req)
		checkDetail(t, w, 400, "Invalid host header")
		if w.Header().Get("Access-Control-Allow-Origin") != "" || w.Header().Get("Vary") != "Origin" {
			t.Errorf("%s for another host: %v; want no CORS header, and Vary: Origin", route, w.Header())
		}
	}
	if n := len(ts.cfg.limiter.failures.entries); n != 0 {
		t.Errorf("limiter holds %d counts after refused hosts, want 0", n)
	}
	if _, found := ts.users.lookup("rebound@example.com"); found {
		t.Error("a registration for another host was stored")
	}
	req := guess(testClient, testEmail, true)
	req.header = local
	checkJSON(t, ts.do(t, req), 200, nil) // not locked out
}

// allowOrigins

// frontEnd is the origin of a learner's own page, allowed by -allow-origin
// in the tests that follow.
const frontEnd = "http://localhost:5173"

// TestAllowOrigins: with -allow-origin, a page of that origin may call
// every route: preflights answer 204 with the route's methods, and every
// answer, errors included, says the page may read it. Other origins get no
// CORS header, and their POSTs are still refused; without the flag nothing
// changes.
func TestAllowOrigins(t *testing.T) {
	ts := newTestServer(t, serverConfig{maxPerAccount: 1, cpus: 1, maxCPUWait: time.Millisecond,
		web: webConfig{allowOrigins: []string{frontEnd, "https://app.example"}}})
	token := ts.token(t)
	from := func(origin string, req request) request {
		req.header = map[string]string{"Origin": origin, "Sec-Fetch-Site": "same-site"}
		return req
	}
	noCredentials := func(w *httptest.ResponseRecorder) {
		t.Helper()
		if got := w.Header().Values("Access-Control-Allow-Credentials"); got != nil {
			t.Errorf("Access-Control-Allow-Credentials = %q, want none", got)
		}
		checkHeaders(t, w, "Vary", "Origin")
	}
	for _, route := range routes {
		method, path, _ := strings.Cut(route, " ")
		w := ts.do(t, from(frontEnd, request{method: "OPTIONS", path: path}))
		if w.Code != 204 || !strings.Contains(w.Header().Get("Access-Control-Allow-Methods"), method) {
			t.Errorf("preflight %s: %d, Allow-Methods %q; want 204 naming %s", path, w.Code,
				w.Header().Get("Access-Control-Allow-Methods"), method)
		}
		allowed := w.Header().Get("Access-Control-Allow-Headers")
		if !strings.Contains(allowed, "Authorization") || !strings.Contains(allowed, "Content-Type") ||
			w.Header().Get("Access-Control-Max-Age") == "" {
			t.Errorf("preflight %s: Allow-Headers %q, Max-Age %q", path, allowed, w.Header().Get("Access-Control-Max-Age"))
		}
		checkHeaders(t, w, "Access-Control-Allow-Origin", frontEnd)
		noCredentials(w)
	}
	answers := []struct {
		req    request
		status int
	}{
		{bearer(from(frontEnd, request{method: "GET", path: "/users/me"}), token), 200},
		{from(frontEnd, request{method: "GET", path: "/users/me"}), 401},
		{from(frontEnd, request{method: "GET", path: "/nowhere"}), 404},
		{from(frontEnd, request{method: "OPTIONS", path: "/nowhere"}), 404},
		{from(frontEnd, request{method: "DELETE", path: "/login"}), 405},
		{from(frontEnd, postJSON("/register", `{"email":"bob@example.com"}`)), 422},
		{from(frontEnd, postJSON("/register", creds("bob@example.com", testPassword))), 201},
		{from(frontEnd, guess(testClient, testEmail, false)), 401},
		{from(frontEnd, guess(testClient, testEmail, false)), 429},
		{from("https://app.example", postJSON("/login", creds("bob@example.com", testPassword))), 200},
	}
	for _, a := range answers {
		w := ts.do(t, a.req)
		if w.Code != a.status {
			t.Errorf("%s %s from %s: status %d, want %d", a.req.method, a.req.path, a.req.header["Origin"], w.Code, a.status)
		}
		checkHeaders(t, w, "Access-Control-Allow-Origin", a.req.header["Origin"], "Access-Control-Expose-Headers",
			"WWW-Authenticate, Retry-After")
		noCredentials(w)
	}
	busy := holdCPUs(t, ts, 1)
	w := ts.do(t, from(frontEnd, postJSON("/login", creds("bob@example.com", testPassword))))
	busy()
	if w.Code != 503 || w.Header().Get("Access-Control-Allow-Origin") != frontEnd {
		t.Errorf("busy: %d, Allow-Origin %q; want 503 that the page may read", w.Code,
			w.Header().Get("Access-Control-Allow-Origin"))
	}

	for _, req := range []request{
		from("http://evil.example", postJSON("/login", creds(testEmail, testPassword))),
		from("http://localhost:5174", postJSON("/register", creds("cat@example.com", testPassword))),
		from("http://evil.example", request{method: "OPTIONS", path: "/login"}),
		{method: "OPTIONS", path: "/login"},
		{method: "GET", path: "/healthz"},
	} {
		w := ts.do(t, req)
		want := map[string]int{"POST": 403, "OPTIONS": 405, "GET": 200}[req.method]
		if w.Code != want || w.Header().Get("Access-Control-Allow-Origin") != "" ||
			w.Header().Get("Access-Control-Expose-Headers") != "" {
			t.Errorf("%s %s from %q: %d %v; want %d and no CORS header", req.method, req.path, req.header["Origin"], w.Code,
				w.Header(), want)
		}
		noCredentials(w)
	}

	plain := newTestServer(t, serverConfig{})
	w = plain.do(t, from(frontEnd, postJSON("/register", creds(testEmail, testPassword))))
	if w.Code != 403 || w.Header().Get("Access-Control-Allow-Origin") != "" || w.Header().Get("Vary") != "" {
		t.Errorf("without -allow-origin: %d %v; want 403 and no CORS header, no Vary", w.Code, w.Header())
	}
}

// routingErrorsInJSON

// TestRoutingErrorsInJSON: the mux's own answers are JSON, as FastAPI's:
// 404 for an unknown path, 405 with Allow for a known path and another
// method. A route's own answers pass as they are.
func TestRoutingErrorsInJSON(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	tests := []struct {
		req    request
		status int
		detail string
		allow  string // the Allow header of a 405
	}{
		{request{method: "GET", path: "/nowhere"}, 404, "Not Found", ""},
		{request{method: "GET", path: "/users/me/"}, 404, "Not Found", ""},
		{request{method: "GET", path: "/login"}, 405, "Method Not Allowed", "POST"},
		{request{method: "PUT", path: "/register"}, 405, "Method Not Allowed", "POST"},
		{request{method: "DELETE", path: "/healthz"}, 405, "Method Not Allowed", "GET, HEAD"},
	}
	for _, tt := range tests {
		w := ts.do(t, tt.req)
		checkJSON(t, w, tt.status, map[string]any{"detail": tt.detail})
		if got := w.Header().Get("Allow"); got != tt.allow {
			t.Errorf("%s %s: Allow = %q, want %q", tt.req.method, tt.req.path, got, tt.allow)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("GET /teapot", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "short and stout")
	}))
	if w, _ := send(routingErrorsInJSON(mux), request{method: "GET", path: "/teapot"}); w.Code != 418 ||
		w.Body.String() != "short and stout" {
		t.Errorf("a route's own 418 = %d %q, want it as written", w.Code, w.Body)
	}
}

// The limits of the listener and the server

// openHealthz opens a connection from the loopback address from to addr,
// and asks for /healthz on it, leaving it open.
func openHealthz(from, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: time.Second}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprint(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	res.Body.Close()
	return conn, nil
}

// fakeListener hands out the connections its test puts in, and then an
// error.
type fakeListener struct {
	net.Listener
	conns chan net.Conn
}

func (l fakeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	default:
		return nil, errors.New("no more connections")
	}
}

// fakeConn is a connection from remote that records whether it was closed.
type fakeConn struct {
	net.Conn
	remote net.Addr
	closed bool
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.remote }
func (c *fakeConn) Close() error         { c.closed = true; return nil }

// TestConnLimiter: a connection over its client's cap or over the cap of
// all is closed at once; an IPv6 /64 is one client; a connection closed
// gives its place back, once.
func TestConnLimiter(t *testing.T) {
	ln := fakeListener{conns: make(chan net.Conn, 1)}
	if limitConnections(ln, 0, 0) != net.Listener(ln) || limitConnections(ln, 2, 0) == net.Listener(ln) ||
		limitConnections(ln, 0, 4) == net.Listener(ln) {
		t.Error("the listener is left as it is only with both caps off")
	}
	limited := limitConnections(ln, 2, 4)
	var held []net.Conn
	for _, remote := range []string{"[2001:db8::1]:1", "[2001:db8::2]:1", "[2001:db8::3]:1", "192.0.2.1:1", "192.0.2.2:1",
		"192.0.2.3:1"} {
		c := &fakeConn{remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(remote))}
		ln.conns <- c
		got, _ := limited.Accept()
		if refused := remote == "[2001:db8::3]:1" || remote == "192.0.2.3:1"; (got == nil) != refused || c.closed != refused {
			t.Errorf("%s: handed out %v, closed %v; want refused %v", remote, got != nil, c.closed, refused)
		}
		if got != nil {
			held = append(held, got)
		}
	}
	l := limited.(*connLimiter)
	held[0].Close()
	held[0].Close()
	if l.openAll != 3 || l.open["2001:db8::/64"] != 1 {
		t.Errorf("after a close, twice: %d open, %d for the /64; want 3, 1", l.openAll, l.open["2001:db8::/64"])
	}
	ln.conns <- &fakeConn{remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort("192.0.2.3:1"))}
	if got, _ := limited.Accept(); got == nil {
		t.Error("a place given back was not taken")
	}
}

// TestBrowserOrigin: an origin as a browser sends it, the one form
// -allow-origin takes.
func TestBrowserOrigin(t *testing.T) {
	for origin, want := range map[string]string{
		"http://localhost:5173":   "http://localhost:5173",
		"http://LocalHost:5173":   "http://localhost:5173",
		"HTTPS://App.Example":     "https://app.example",
		"http://localhost:80":     "http://localhost",
		"https://app.example:443": "https://app.example",
		"http://app.example:443":  "http://app.example:443",
		"http://[::1]:5173":       "http://[::1]:5173",
		"http://[::1]:80":         "http://[::1]",
	} {
		if got := browserOrigin(origin); got != want {
			t.Errorf("browserOrigin(%q) = %q, want %q", origin, got, want)
		}
	}
}

// TestDefaultMaxConnections: the cap on all connections is the limit on
// open files, less the server's own: the limit Go raised at start, here
// read with getrlimit(2).
func TestDefaultMaxConnections(t *testing.T) {
	var limit syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &limit); err != nil {
		t.Skip(err)
	}
	if got, want := defaultMaxConnections(), int(limit.Cur)-descriptorsKept; got != want {
		t.Errorf("defaultMaxConnections() = %d, want the limit %d less %d", got, limit.Cur, descriptorsKept)
	}
}

// TestHTTPServerLimits: the limits that keep a slow or greedy client from
// holding a connection. Waiting them out would take seconds, so the test
// reads the values the README promises; net/http's own tests cover what
// each one does. The header limit is tried on a real connection.
func TestHTTPServerLimits(t *testing.T) {
	srv := newHTTPServer(http.NotFoundHandler(), discardLog)
	limits := []struct {
		name      string
		got, want time.Duration
	}{
		{"ReadHeaderTimeout", srv.ReadHeaderTimeout, 5 * time.Second},
		{"ReadTimeout", srv.ReadTimeout, 10 * time.Second},
		{"WriteTimeout", srv.WriteTimeout, 10 * time.Second},
		{"IdleTimeout", srv.IdleTimeout, 60 * time.Second},
	}
	for _, l := range limits {
		if l.got != l.want {
			t.Errorf("%s = %v, want %v", l.name, l.got, l.want)
		}
	}

	// The request line and headers may take 16 KiB in all, and not a byte
	// more: Go reads 4 KiB past MaxHeaderBytes.
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	for size, want := range map[int]int{16 << 10: 204, 16<<10 + 1: 431} {
		head := "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: "
		head += strings.Repeat("p", size-len(head)-len("\r\n\r\n")) + "\r\n\r\n"
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(conn, head)
		res, err := http.ReadResponse(bufio.NewReader(conn), nil)
		conn.Close()
		if err != nil {
			t.Fatalf("request line and headers of %d bytes: %v", len(head), err)
		}
		if res.StatusCode != want {
			t.Errorf("request line and headers of %d bytes: status %d, want %d", len(head), res.StatusCode, want)
		}
	}
}

// 5. Store

// snapshot describes every file below dir: its name and content.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", path, errors.Unwrap(err))
			return nil
		}
		data, _ := os.ReadFile(path)
		fmt.Fprintf(&b, "%s %q\n", path, data)
		return nil
	})
	return b.String()
}

// storeFileBytes returns the content of a users file holding f.
func storeFileBytes(f storeFile) []byte {
	var buf bytes.Buffer
	encodeStoreFile(&buf, f)
	return buf.Bytes()
}

// readStoreFile reads and decodes a users file.
func readStoreFile(t *testing.T, path string) storeFile {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f storeFile
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("users file is not JSON: %v", err)
	}
	return f
}

func TestStoreSurvivesRestart(t *testing.T) {
	first := newTestServer(t, serverConfig{})
	token := first.token(t)
	first.register(t, "bob@example.com", testPassword)

	second := newTestServer(t, serverConfig{usersPath: first.path})
	checkJSON(t, second.me(t, token), 200, map[string]any{"id": 1, "email": testEmail})
	checkJSON(t, second.login(t, "bob@example.com", testPassword), 200, nil)
	checkJSON(t, second.register(t, "ANN@example.com", testPassword), 409, nil)
	checkJSON(t, second.register(t, "cat@example.com", testPassword), 201, map[string]any{"id": 3})
}

func TestStoreFile(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	if _, err := os.Stat(ts.path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("users file exists before the first registration: %v", err)
	}
	ts.register(t, testEmail, testPassword)
	ts.register(t, "bob@example.com", testPassword)

	info, err := os.Stat(ts.path)
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Mode().Perm(); got != 0o600 {
		t.Errorf("mode = %v, want 0600", got)
	}
	if data, _ := os.ReadFile(ts.path); bytes.Contains(data, []byte(testPassword)) {
		t.Error("users file holds a password")
	}
	f := readStoreFile(t, ts.path)
	if f.NextID != 3 || len(f.Users) != 2 || f.Users[0].ID != 1 || f.Users[1].Email != "bob@example.com" {
		t.Errorf("users file = %+v", f)
	}
	for _, u := range f.Users {
		if cost, err := bcrypt.Cost([]byte(u.PasswordHash)); err != nil || cost != bcrypt.MinCost {
			t.Errorf("hash of %s: cost %d, %v", u.Email, cost, err)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(ts.path))
	if len(entries) != 1 {
		t.Errorf("folder holds %d files, want only the users file (no temporary files left)", len(entries))
	}
}

// TestStoreIDsNeverRepeat removes the last user by hand: the next one
// still gets a new id.
func TestStoreIDsNeverRepeat(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	ts.register(t, testEmail, testPassword)
	ts.register(t, "bob@example.com", testPassword)
	f := readStoreFile(t, ts.path)
	f.Users = f.Users[:1]
	data, _ := json.Marshal(f)
	if err := os.WriteFile(ts.path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	again := newTestServer(t, serverConfig{usersPath: ts.path})
	checkJSON(t, again.register(t, "cat@example.com", testPassword), 201, map[string]any{"id": 3})
}

func TestStoreRefusesInvalidFile(t *testing.T) {
	hash, _ := hashPassword(testPassword, bcrypt.MinCost)
	user := func(id int, email string) string {
		return fmt.Sprintf(`{"id":%d,"email":%q,"password_hash":%q}`, id, email, hash)
	}
	valid := `{"next_id":3,"users":[` + user(1, "ann@example.com") + `,` + user(2, "bob@example.com") + `]}`
	tests := []struct{ name, content string }{
		{"empty", ``},
		{"truncated", valid[:len(valid)/2]},
		{"garbage", "\x00\x01not json"},
		{"an array", `[]`},
		{"null", `null`},
		{"a number", `42`},
		{"next_id negative", `{"next_id":-1,"users":[]}`},
		{"trailing data", valid + `{}`},
		{"unknown field", `{"next_id":1,"users":[],"admins":[]}`},
		{"duplicate emails", `{"next_id":3,"users":[` + user(1, "ann@example.com") + `,` + user(2, "ann@example.com") + `]}`},
		{"duplicate emails in another case", `{"next_id":3,"users":[` + user(1, "ann@example.com") + `,` + user(2,
			"Ann@example.com") + `]}`},
		{"duplicate ids", `{"next_id":3,"users":[` + user(1, "ann@example.com") + `,` + user(1, "bob@example.com") + `]}`},
		{"id zero", `{"next_id":3,"users":[` + user(0, "ann@example.com") + `]}`},
		{"empty email", `{"next_id":3,"users":[` + user(1, "") + `]}`},
		{"next_id not above ids", `{"next_id":2,"users":[` + user(1, "ann@example.com") + `,` + user(2,
			"bob@example.com") + `]}`},
		{"not a bcrypt hash", `{"next_id":2,"users":[{"id":1,"email":"ann@example.com","password_hash":"secret"}]}`},
		{"id a string", `{"next_id":2,"users":[{"id":"1","email":"ann@example.com","password_hash":"x"}]}`},
		{"not UTF-8", "{\"users\":[{\"id\":1,\"email\":\"x\xffy@example.com\",\"password_hash\":\"" + hash + "\"}]}"},
		{"id of 2^53", `{"users":[` + user(1<<53, "ann@example.com") + `]}`},
		{"next_id of 2^53", `{"next_id":9007199254740992,"users":[]}`},
		{"next_id that an int64 only just holds", `{"next_id":9223372036854775807,"users":[]}`},
		{"next_id beyond an int64", `{"next_id":9223372036854775808,"users":[]}`},
		{"NEXT_ID in capitals", `{"NEXT_ID":3,"users":[]}`},
		{"Users", `{"next_id":3,"Users":[]}`},
		{"EMAIL in capitals", `{"users":[{"id":1,"EMAIL":"ann@example.com","password_hash":"` + hash + `"}]}`},
		{"password_hash with long s", `{"users":[{"id":1,"email":"ann@example.com","paſſword_haſh":"` + hash + `"}]}`},
		{"next_id named twice", `{"next_id":3,"next_id":4,"users":[]}`},
		{"email named twice",
			`{"users":[{"id":1,"email":"bob@example.com","email":"ann@example.com","password_hash":"` + hash + `"}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "users.json")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := openStore(path, discardLog)
			if err == nil || !strings.Contains(err.Error(), path) {
				t.Errorf("openStore = %v, want an error naming %s", err, path)
			}
			if got, _ := os.ReadFile(path); string(got) != tt.content {
				t.Errorf("file changed to %q", got)
			}
		})
	}
	accepted := []struct {
		name, content string
		nextID        int64
	}{
		{"empty object", `{}`, 1},
		{"no users", `{"next_id": 7, "users": []}`, 7},
		{"next_id not given", `{"users":[` + user(4, "ann@example.com") + `,` + user(2, "bob@example.com") + `]}`, 5},
	}
	for _, tt := range accepted {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "users.json")
			os.WriteFile(path, []byte(tt.content), 0o600)
			s, err := openStore(path, discardLog)
			if err != nil {
				t.Fatalf("openStore = %v, want it accepted", err)
			}
			if u, err := s.add(context.Background(), "new@example.com", hash); err != nil || u.ID != tt.nextID {
				t.Errorf("next user = %+v, %v; want id %d", u, err, tt.nextID)
			}
		})
	}
	t.Run("next_id of 2^53-1: loaded, no id left to give", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "users.json")
		os.WriteFile(path, []byte(`{"next_id":9007199254740991,"users":[]}`), 0o600)
		s, err := openStore(path, discardLog)
		if err != nil {
			t.Fatalf("openStore = %v, want it accepted", err)
		}
		if u, err := s.add(context.Background(), "new@example.com", hash); err == nil || !strings.Contains(err.Error(),
			"2^53") {
			t.Errorf("add = %+v, %v; want an error: the next next_id would be 2^53", u, err)
		}
	})
	t.Run("valid control", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "users.json")
		os.WriteFile(path, []byte(valid), 0o600)
		s, err := openStore(path, discardLog)
		if err != nil {
			t.Fatalf("openStore(valid) = %v", err)
		}
		if u, ok := s.lookup("bob@example.com"); !ok || u.ID != 2 {
			t.Errorf("lookup(bob) = %+v, %v", u, ok)
		}
	})
}

// TestStoreRelativePath: a users file named without a folder, as the
// default users.json is, is written in the working folder.
func TestStoreRelativePath(t *testing.T) {
	t.Chdir(t.TempDir())
	s, err := openStore("users.json", discardLog)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.add(context.Background(), testEmail, mustHash(t, testPassword, bcrypt.MinCost)); err != nil {
		t.Fatal(err)
	}
	if f := readStoreFile(t, "users.json"); len(f.Users) != 1 {
		t.Errorf("users.json = %+v, want the user", f)
	}
}

// TestStoreCostliestCost: the highest cost of the stored hashes, which run
// takes with the server's own as the cost every failed login costs.
func TestStoreCostliestCost(t *testing.T) {
	hash := mustHash(t, testPassword, bcrypt.MinCost)
	empty, _ := openStore(writeUsers(t), discardLog)
	mixed, _ := openStore(writeUsers(t, User{ID: 1, Email: testEmail, PasswordHash: withCost(hash, 7)},
		User{ID: 2, Email: "bob@example.com", PasswordHash: withCost(hash, 5)}), discardLog)
	if got, want := []int{empty.costliestCost(), mixed.costliestCost()}, []int{0, 7}; !slices.Equal(got, want) {
		t.Errorf("costliestCost of no users and of costs 7 and 5 = %v, want %v", got, want)
	}
}

// TestFilePart: the users file's refusals name the part at fault.
func TestFilePart(t *testing.T) {
	for p, want := range map[jsontext.Pointer]string{"": "the file", "/users/3": "user 3", "/x": "/x"} {
		if got := filePart(p); got != want {
			t.Errorf("filePart(%q) = %q, want %q", p, got, want)
		}
	}
}

// TestStoreChecksHashes: every stored hash is checked whole at start, as
// bcrypt writes one, and a hash that only looks like one, which would fail
// every comparison at once and so answer sooner than any other, stops the
// server with an error naming its user. So does a cost above 14: one
// comparison would take over a second, and every failed login as long.
func TestStoreChecksHashes(t *testing.T) {
	hash := mustHash(t, testPassword, bcrypt.MinCost)
	tests := []struct {
		name, hash string
		ok         bool
	}{
		{"$2a$ at cost 4", hash, true},
		{"$2b$, as passlib writes", "$2b$" + hash[4:], true},
		{"$2y$, as PHP writes", "$2y$" + hash[4:], true},
		{"cost 14", withCost(hash, 14), true},
		{"cost 15", withCost(hash, 15), false},
		{"cost 31", withCost(hash, 31), false},
		{"cost 3", withCost(hash, 3), false},
		{"cost +4", hash[:4] + "+4" + hash[6:], false},
		{"$2x$", "$2x$" + hash[4:], false},
		{"$2$", "$2$" + hash[3:], false},
		{"a character outside bcrypt's alphabet", hash[:40] + "!" + hash[41:], false},
		{"a salt of +", hash[:7] + strings.Repeat("+", 22) + hash[29:], false},
		{"one byte short", hash[:59], false},
		{"one byte more", hash + "a", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		path := writeUsers(t, User{ID: 1, Email: testEmail, PasswordHash: hash}, User{ID: 2, Email: "bob@example.com",
			PasswordHash: tt.hash})
		_, err := openStore(path, discardLog)
		if tt.ok != (err == nil) || err != nil && (!strings.Contains(err.Error(), "user 1 (bob@example.com)") ||
			!strings.Contains(err.Error(), path)) {
			t.Errorf("%s: openStore = %v; want loaded %v, or an error naming the file and bob", tt.name, err, tt.ok)
		}
	}
}

// TestStoreSymlink: a users file that is a symbolic link, here to a file
// not made yet, is written through to its target, and stays a link.
func TestStoreSymlink(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "data"), 0o700)
	link := filepath.Join(dir, "users.json")
	if err := os.Symlink(filepath.Join("data", "real.json"), link); err != nil {
		t.Fatal(err)
	}
	ts := newTestServer(t, serverConfig{usersPath: link})
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
	checkJSON(t, ts.register(t, "bob@example.com", testPassword), 201, nil)
	if info, err := os.Lstat(link); err != nil || info.Mode()&os.ModeSymlink == 0 {
		t.Errorf("users file is no longer a link: %v, %v", info.Mode(), err)
	}
	if f := readStoreFile(t, filepath.Join(dir, "data", "real.json")); len(f.Users) != 2 {
		t.Errorf("link's target holds %+v, want both users", f)
	}
	checkJSON(t, newTestServer(t, serverConfig{usersPath: link}).login(t, "bob@example.com", testPassword), 200, nil)
}

// TestStoreChanges: setHash replaces only the hash it was given, and keeps
// the session; setPassword and endSessions give a new session; remove keeps
// next_id; a user who is gone is errNoUser. Each change is in the file.
func TestStoreChanges(t *testing.T) {
	ctx := context.Background()
	s, _ := openStore(filepath.Join(t.TempDir(), "users.json"), discardLog)
	ann, _ := s.add(ctx, testEmail, "hash-1")
	bob, _ := s.add(ctx, "bob@example.com", "hash-1")
	if ann.Session == "" || ann.Session == bob.Session {
		t.Errorf("sessions %q and %q: want two, made anew", ann.Session, bob.Session)
	}
	if err := s.setHash(ctx, ann.ID, "not the hash", "hash-2"); err == nil {
		t.Error("setHash over a hash changed meanwhile succeeded")
	}
	if err := s.setHash(ctx, ann.ID, "hash-1", "hash-2"); err != nil {
		t.Fatal(err)
	}
	if u, _ := s.lookup(testEmail); u.PasswordHash != "hash-2" || u.Session != ann.Session {
		t.Errorf("after setHash: %+v; want hash-2 and the same session", u)
	}
	u, err := s.setPassword(ctx, ann.ID, ann.Session, "hash-3")
	if err != nil || u.PasswordHash != "hash-3" || u.Session == ann.Session {
		t.Errorf("setPassword = %+v, %v; want hash-3 and a new session", u, err)
	}
	if _, err := s.setPassword(ctx, ann.ID, ann.Session, "hash-4"); !errors.Is(err, errSessionEnded) {
		t.Errorf("setPassword for an ended session = %v, want errSessionEnded", err)
	}
	if err := s.endSessions(ctx, ann.ID); err != nil {
		t.Fatal(err)
	}
	if after, _ := s.lookup(testEmail); after.Session == u.Session {
		t.Error("endSessions kept the session")
	}
	if err := s.remove(ctx, bob.ID, "not bob's session"); !errors.Is(err, errSessionEnded) {
		t.Errorf("remove for an ended session = %v, want errSessionEnded", err)
	}
	if err := s.remove(ctx, bob.ID, bob.Session); err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{s.remove(ctx, bob.ID, bob.Session), s.endSessions(ctx, bob.ID), s.setHash(ctx, 99, "",
		"")} {
		if !errors.Is(err, errNoUser) {
			t.Errorf("a change to a user who is gone = %v, want errNoUser", err)
		}
	}
	f := readStoreFile(t, s.path)
	if len(f.Users) != 1 || f.NextID != 3 || f.Users[0] != func() User { u, _ := s.lookup(testEmail); return u }() {
		t.Errorf("users file = %+v, want ann as in memory, next_id 3", f)
	}
}

// TestAccountRoutesRace: of two changes made at once with one token, the
// one written first wins, and the other answers 401 as its token's session
// has ended: no answer hands out a token or a password that does not work.
func TestAccountRoutesRace(t *testing.T) {
	for _, second := range []string{"change", "delete"} {
		ts := newTestServer(t, serverConfig{cpus: 2})
		token := ts.token(t)
		reqs := map[string]request{
			"change": changePassword(token, testPassword, "the first new passphrase"),
			"delete": deleteAccount(token, testPassword),
		}
		first, other := make(chan *httptest.ResponseRecorder), make(chan *httptest.ResponseRecorder)
		go func() { first <- ts.do(t, changePassword(token, testPassword, "the other new passphrase")) }()
		go func() { other <- ts.do(t, reqs[second]) }()
		a, b := <-first, <-other
		codes := []int{a.Code, b.Code}
		if slices.Sort(codes); codes[0] >= 300 || codes[1] != 401 {
			t.Errorf("with a %s: statuses %d and %d, want one success and one 401", second, a.Code, b.Code)
		}
		if a.Code == 200 {
			checkJSON(t, ts.me(t, decode(t, a.Body.Bytes())["access_token"].(string)), 200, nil)
			checkJSON(t, ts.login(t, testEmail, "the other new passphrase"), 200, nil)
		}
	}
}

// TestAccountRoutesStore: the account's routes keep the users file's
// promises: a change that cannot get its turn is a 503 and changes
// nothing, and a hand edit is never overwritten.
func TestAccountRoutesStore(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	token := ts.token(t)
	ts.users.maxWriteWait = 10 * time.Millisecond
	ts.users.lockWrites(context.Background())
	for _, req := range []request{logout(token), changePassword(token, testPassword, "a new and longer passphrase"),
		deleteAccount(token, testPassword)} {
		checkDetail(t, ts.do(t, req), 503, "Server busy")
	}
	ts.users.unlockWrites()
	checkJSON(t, ts.me(t, token), 200, nil)
	editorSave(t, ts.path)
	edited := snapshot(t, filepath.Dir(ts.path))
	checkDetail(t, ts.do(t, logout(token)), 500, "Internal server error")
	if snapshot(t, filepath.Dir(ts.path)) != edited {
		t.Error("a logout overwrote a hand edit")
	}
	checkJSON(t, ts.me(t, token), 200, nil)
}

// TestRegisterWriteBusy: a registration that cannot start its file write
// within the bound, because another write holds the file, answers 503 with
// Retry-After and is not stored; once the file is free, it can be.
func TestRegisterWriteBusy(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	ts.users.maxWriteWait = 20 * time.Millisecond
	if err := ts.users.lockWrites(context.Background()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	w := ts.register(t, testEmail, testPassword)
	checkJSON(t, w, 503, map[string]any{"detail": "Server busy, try again later"})
	checkHeaders(t, w, "Retry-After", "1")
	if waited := time.Since(start); waited < 20*time.Millisecond {
		t.Errorf("answered after %v, before the bound of 20ms", waited)
	}
	ts.users.unlockWrites()
	if _, err := os.Stat(ts.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("users file written for a registration answered 503: %v", err)
	}
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
}

// TestRegisterClientGaveUp: a client that gives up while its registration
// is being written, here just before the rename, is not registered after
// all: nothing is stored that its client did not hear of.
func TestRegisterClientGaveUp(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
	before := snapshot(t, filepath.Dir(ts.path))
	ctx, cancel := context.WithCancel(context.Background())
	real := ts.users.disk.sync
	ts.users.disk.sync = func(f *os.File) error { cancel(); return real(f) }
	r := httptest.NewRequestWithContext(ctx, "POST", "/register", strings.NewReader(creds("bob@example.com",
		testPassword)))
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	ts.handler.ServeHTTP(w, r)
	if w.Code != http.StatusServiceUnavailable {
		t.Errorf("register = %d, want 503", w.Code)
	}
	if _, found := ts.users.lookup("bob@example.com"); found || snapshot(t, filepath.Dir(ts.path)) != before {
		t.Error("a registration whose client gave up was stored")
	}
}

// watchDisk wraps the store's disk steps: it records each one, as "sync
// file" (the temporary file's), "rename" or "sync folder", and makes the
// one named fail return an error instead of running.
func watchDisk(s *store, fail string) *[]string {
	var steps []string
	real := s.disk
	step := func(name string, do func() error) error {
		steps = append(steps, name)
		if name == fail {
			return errors.New("injected failure")
		}
		return do()
	}
	s.disk = diskSteps{
		sync: func(f *os.File) error {
			name := "sync file"
			if info, err := f.Stat(); err == nil && info.IsDir() {
				name = "sync folder"
			}
			return step(name, func() error { return real.sync(f) })
		},
		rename: func(oldpath, newpath string) error {
			return step("rename", func() error { return real.rename(oldpath, newpath) })
		},
	}
	return &steps
}

// TestRegisterWriteFails fails a registration's write before the new file
// is in place: the registration answers 500, memory does not hold the user,
// and the folder is as it was. Once the disk works again, the next write and
// the next start see only what was answered with a 201.
func TestRegisterWriteFails(t *testing.T) {
	tests := []struct {
		name    string
		breakIt func(t *testing.T, ts *testServer)
	}{
		{"temporary file's sync fails", func(t *testing.T, ts *testServer) { watchDisk(ts.users, "sync file") }},
		{"rename fails", func(t *testing.T, ts *testServer) { watchDisk(ts.users, "rename") }},
		{"read-only folder", func(t *testing.T, ts *testServer) {
			if os.Geteuid() == 0 {
				t.Skip("root writes to read-only folders; the other cases fail the write as root too")
			}
			dir := filepath.Dir(ts.path)
			os.Chmod(dir, 0o500)
			t.Cleanup(func() { os.Chmod(dir, 0o700) })
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTestServer(t, serverConfig{})
			checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
			real := ts.users.disk
			tt.breakIt(t, ts)
			before := snapshot(t, filepath.Dir(ts.path))

			checkJSON(t, ts.register(t, "bob@example.com", testPassword), 500, map[string]any{"detail": "Internal server error"})
			if _, found := ts.users.lookup("bob@example.com"); found {
				t.Error("user in memory after a failed write")
			}
			checkJSON(t, ts.login(t, "bob@example.com", testPassword), 401, nil)
			if after := snapshot(t, filepath.Dir(ts.path)); after != before {
				t.Errorf("folder changed by a failed write:\nbefore: %s\nafter: %s", before, after)
			}

			ts.users.disk = real
			os.Chmod(filepath.Dir(ts.path), 0o700)
			checkJSON(t, ts.register(t, "cat@example.com", testPassword), 201, map[string]any{"id": 2})
			restarted := newTestServer(t, serverConfig{usersPath: ts.path})
			for email, want := range map[string]bool{testEmail: true, "bob@example.com": false, "cat@example.com": true} {
				if _, found := restarted.users.lookup(email); found != want {
					t.Errorf("after restart, %s registered = %v, want %v", email, found, want)
				}
			}
		})
	}
}

// TestRegisterFolderSyncFails fails the folder's sync after the rename: the
// new file is in place, so memory holds the user too. The client heard 500,
// and a second registration of the email says 409.
func TestRegisterFolderSyncFails(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	watchDisk(ts.users, "sync folder")
	checkJSON(t, ts.register(t, testEmail, testPassword), 500, map[string]any{"detail": "Internal server error"})
	checkJSON(t, ts.register(t, testEmail, testPassword), 409, nil)
	checkJSON(t, ts.login(t, testEmail, testPassword), 200, nil)
	if f := readStoreFile(t, ts.path); len(f.Users) != 1 || f.Users[0].Email != testEmail {
		t.Errorf("users file = %+v, want the user", f)
	}
	checkJSON(t, ts.register(t, "bob@example.com", testPassword), 500, nil) // the folder's sync still fails
	checkJSON(t, newTestServer(t, serverConfig{usersPath: ts.path}).register(t, "cat@example.com", testPassword), 201,
		map[string]any{"id": 3})
}

// TestStoreDurableSteps: a write syncs the temporary file, renames it over
// the users file, then syncs the folder, in that order: a crash between any
// two steps leaves the old file or the new one whole, and once the folder
// is synced the new one survives a power cut.
func TestStoreDurableSteps(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	steps := watchDisk(ts.users, "")
	checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
	if got, want := strings.Join(*steps, ", "), "sync file, rename, sync folder"; got != want {
		t.Errorf("steps = %s, want %s", got, want)
	}
}

// TestStoreHandEdits changes the users file while the server runs: the next
// registration answers 500, the log says to restart, and the change stays
// as it was made. A restart loads it.
func TestStoreHandEdits(t *testing.T) {
	tests := []struct {
		name string
		edit func(t *testing.T, path string)
	}{
		{"a user removed", func(t *testing.T, path string) {
			f := readStoreFile(t, path)
			f.Users = f.Users[1:]
			os.WriteFile(path, storeFileBytes(f), 0o600)
		}},
		{"same size, one letter changed", func(t *testing.T, path string) {
			data, _ := os.ReadFile(path)
			os.WriteFile(path, bytes.Replace(data, []byte("bob@"), []byte("rob@"), 1), 0o600)
		}},
		{"file removed", func(t *testing.T, path string) { os.Remove(path) }},
		{"an editor's save: a new file renamed over it", editorSave},
		{"an editor's save that keeps the size and time, as cp -p does", func(t *testing.T, path string) {
			info, _ := os.Stat(path)
			data, _ := os.ReadFile(path)
			os.WriteFile(path+".edit", bytes.Replace(data, []byte("bob@"), []byte("rob@"), 1), 0o600)
			os.Chtimes(path+".edit", info.ModTime(), info.ModTime())
			os.Rename(path+".edit", path)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log syncBuffer
			ts := newTestServer(t, serverConfig{logger: slog.New(slog.NewTextHandler(&log, nil))})
			ts.register(t, testEmail, testPassword)
			ts.register(t, "bob@example.com", testPassword)
			tt.edit(t, ts.path)
			edited := snapshot(t, filepath.Dir(ts.path))

			checkJSON(t, ts.register(t, "cat@example.com", testPassword), 500, map[string]any{"detail": "Internal server error"})
			if after := snapshot(t, filepath.Dir(ts.path)); after != edited {
				t.Errorf("the edit was overwritten:\nedited: %s\nafter: %s", edited, after)
			}
			if !strings.Contains(log.String(), "changed on disk") || !strings.Contains(log.String(), "restart") {
				t.Errorf("log does not say that the file changed and to restart:\n%s", log.String())
			}
			if _, found := ts.users.lookup("cat@example.com"); found {
				t.Error("user in memory after a refused write")
			}
			checkJSON(t, newTestServer(t, serverConfig{usersPath: ts.path}).register(t, "cat@example.com", testPassword), 201,
				nil)
		})
	}
	t.Run("an editor's save at the last moment before the rename", func(t *testing.T) {
		ts := newTestServer(t, serverConfig{})
		checkJSON(t, ts.register(t, testEmail, testPassword), 201, nil)
		real := ts.users.disk.sync
		ts.users.disk.sync = func(f *os.File) error {
			err := real(f)
			if strings.Contains(f.Name(), ".tmp-") { // the new file is written and synced
				editorSave(t, ts.path)
			}
			return err
		}
		edited := ""
		ts.users.disk.rename = func(oldpath, newpath string) error {
			edited = snapshot(t, filepath.Dir(ts.path))
			return os.Rename(oldpath, newpath)
		}
		checkJSON(t, ts.register(t, "bob@example.com", testPassword), 500, nil)
		if edited != "" {
			t.Error("the write went on to its rename after the file was changed")
		}
		if f := readStoreFile(t, ts.path); len(f.Users) != 1 || f.Users[0].Email != "edited@example.com" {
			t.Errorf("users file = %+v, want the editor's", f)
		}
	})
	t.Run("file made where there was none", func(t *testing.T) {
		ts := newTestServer(t, serverConfig{})
		os.WriteFile(ts.path, []byte(`{"users": []}`), 0o600)
		checkJSON(t, ts.register(t, testEmail, testPassword), 500, nil)
		if got, _ := os.ReadFile(ts.path); string(got) != `{"users": []}` {
			t.Errorf("file = %s, want it as made by hand", got)
		}
	})
}

// editorSave changes the users file as an editor saves it: it writes a new
// file beside it and renames that over it.
func editorSave(t *testing.T, path string) {
	t.Helper()
	f := readStoreFile(t, path)
	f.Users[0].Email = "edited@example.com"
	if err := os.WriteFile(path+".edit", storeFileBytes(f), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".edit", path); err != nil {
		t.Fatal(err)
	}
}

// TestStoreFileModeWarning: a users file that others may read is loaded,
// with a warning that names it and its mode; a 0600 file, without.
func TestStoreFileModeWarning(t *testing.T) {
	for _, mode := range []os.FileMode{0o644, 0o640, 0o600} {
		path := filepath.Join(t.TempDir(), "users.json")
		os.WriteFile(path, []byte(`{"users": []}`), 0o600)
		os.Chmod(path, mode)
		var log bytes.Buffer
		if _, err := openStore(path, slog.New(slog.NewTextHandler(&log, nil))); err != nil {
			t.Fatalf("openStore (mode %v) = %v", mode, err)
		}
		warned := strings.Contains(log.String(), "level=WARN") && strings.Contains(log.String(), path) &&
			strings.Contains(log.String(), mode.String())
		if want := mode != 0o600; warned != want {
			t.Errorf("mode %v: warned = %v, want %v; log:\n%s", mode, warned, want, log.String())
		}
	}
}

// TestStoreWritesEmailsAsTheyAre: no HTML escaping in the file.
func TestStoreWritesEmailsAsTheyAre(t *testing.T) {
	ts := newTestServer(t, serverConfig{})
	checkJSON(t, ts.register(t, "a&b@example.com", testPassword), 201, nil)
	if data, _ := os.ReadFile(ts.path); !bytes.Contains(data, []byte(`"a&b@example.com"`)) {
		t.Errorf("users file does not hold the email as it is:\n%s", data)
	}
}

// 6. Run

// syncBuffer is a bytes.Buffer that run's logger and the test may share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// envOf returns a lookupEnv over env.
func envOf(env map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

// startRun runs the program in a goroutine on a free loopback port and
// returns its address, its log, and a channel that gets run's result.
func startRun(t *testing.T, ctx context.Context, args []string, env map[string]string) (string, *syncBuffer,
	chan error) {
	t.Helper()
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, append([]string{"-addr", "127.0.0.1:0"}, args...), envOf(env), out) }()
	addrRe := regexp.MustCompile(`msg=listening addr=(\S+)`)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := addrRe.FindStringSubmatch(out.String()); m != nil {
			return m[1], out, done
		}
		select {
		case err := <-done:
			t.Fatalf("run ended before listening: %v\n%s", err, out)
		default:
		}
	}
	t.Fatalf("run did not start listening:\n%s", out)
	return "", nil, nil
}

// waitRun waits for run to stop, and checks that it returned nil: main then
// exits 0.
func waitRun(t *testing.T, done chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not stop")
	}
}

// TestLoadSecret: JWT_SECRET as given if it is long enough, an error if it
// is not, and without it a secret of 32 random bytes, new each time.
func TestLoadSecret(t *testing.T) {
	secret, err := loadSecret(envOf(map[string]string{"JWT_SECRET": testSecret}), discardLog)
	if err != nil || string(secret) != testSecret {
		t.Errorf("loadSecret(set) = %q, %v; want the variable", secret, err)
	}
	if _, err := loadSecret(envOf(map[string]string{"JWT_SECRET": testSecret[:31]}), discardLog); err == nil {
		t.Error("loadSecret(31 bytes) succeeded, want an error")
	}
	if _, err := loadSecret(envOf(map[string]string{"JWT_SECRET": testSecret[:32]}), discardLog); err != nil {
		t.Errorf("loadSecret(32 bytes) = %v, want it taken", err)
	}
	first, _ := loadSecret(envOf(nil), discardLog)
	second, _ := loadSecret(envOf(nil), discardLog)
	if len(first) != 32 || bytes.Equal(first, make([]byte, 32)) || string(first) == string(second) {
		t.Errorf("loadSecret(unset) = %x, then %x; want 32 random bytes, new each time", first, second)
	}
}

// TestServeFinishesRequestsInFlight tells serve to stop while a request is
// in flight: no new connection is taken, the request finishes and is
// answered, and serve returns nil.
func TestServeFinishesRequestsInFlight(t *testing.T) {
	started, finish := make(chan struct{}), make(chan struct{})
	srv := newHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-finish
		writeJSON(w, http.StatusOK, map[string]string{"status": "finished"})
	}), discardLog)
	stopping := make(chan struct{})
	srv.RegisterOnShutdown(func() { close(stopping) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + ln.Addr().String() + "/"
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	var log syncBuffer
	go func() { served <- serve(ctx, srv, ln, slog.New(slog.NewTextHandler(&log, nil))) }()

	answered := make(chan error, 1)
	go func() {
		res, err := http.Get(url)
		if err == nil {
			res.Body.Close()
			if res.StatusCode != 200 {
				err = fmt.Errorf("status %d", res.StatusCode)
			}
		}
		answered <- err
	}()
	<-started
	cancel() // as SIGTERM does in run
	<-stopping
	time.Sleep(100 * time.Millisecond) // a stop with no grace would have cut the request by now
	if _, err := http.Get(url); err == nil {
		t.Error("a new connection was served while stopping")
	}
	close(finish)
	if err := <-answered; err != nil {
		t.Errorf("the request in flight got %v, want its answer", err)
	}
	if err := <-served; err != nil {
		t.Errorf("serve = %v, want nil", err)
	}
	if strings.Contains(log.String(), "cut off") || !strings.Contains(log.String(), "msg=stopped") {
		t.Errorf("serve's log, for requests that finished in time:\n%s", log.String())
	}
}

func TestRunServesAndStops(t *testing.T) {
	t.Parallel() // run makes its dummy hash at DefaultCost
	users := filepath.Join(t.TempDir(), "users.json")
	ctx, cancel := context.WithCancel(context.Background())
	args := []string{"-users", users, "-max-failures-per-email", "0", "-max-connections",
		fmt.Sprint(defaultMaxConnections())}
	addr, out, done := startRun(t, ctx, args, map[string]string{"JWT_SECRET": testSecret})

	res, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Errorf("/healthz = %d", res.StatusCode)
	}
	// Headers: room for a token of 8 KiB and more, not for 32 KiB.
	for size, want := range map[int]int{12 << 10: 200, 32 << 10: http.StatusRequestHeaderFieldsTooLarge} {
		req, _ := http.NewRequest("GET", "http://"+addr+"/healthz", nil)
		req.Header.Set("X-Padding", strings.Repeat("p", size))
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != want {
			t.Errorf("/healthz with a %d-byte header = %d, want %d", size, res.StatusCode, want)
		}
	}
	cancel()
	waitRun(t, done)
	log := out.String()
	if !strings.Contains(log, "addr="+addr) || !strings.Contains(log, "path=/healthz status=200") {
		t.Errorf("log lacks the start line or the request line:\n%s", log)
	}
	if strings.Contains(log, "JWT_SECRET") {
		t.Errorf("log warns about JWT_SECRET although it is set:\n%s", log)
	}
}

// TestRunConnectionsFlag: run caps each address's connections at
// -max-connections-per-address, and all at -max-connections.
func TestRunConnectionsFlag(t *testing.T) {
	t.Parallel() // run makes its dummy hash at DefaultCost
	ctx, cancel := context.WithCancel(context.Background())
	args := []string{"-users", filepath.Join(t.TempDir(), "users.json"), "-max-connections-per-address", "2",
		"-max-connections", "3"}
	addr, _, done := startRun(t, ctx, args, nil)
	var held []net.Conn
	for _, from := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.3"} {
		conn, err := openHealthz(from, addr)
		if err != nil {
			continue
		}
		defer conn.Close()
		held = append(held, conn)
	}
	if len(held) != 3 {
		t.Errorf("%d connections served, want 3: two from 127.0.0.1 (its cap) and one from 127.0.0.2 (the cap of all)",
			len(held))
	}
	held[0].Close() // its place is given back
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		conn, err := openHealthz("127.0.0.3", addr)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a closed connection did not give its place back: %v", err)
		}
	}
	for i, conn := range held[1:] { // and the connections open are still served
		fmt.Fprint(conn, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
		if res, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || res.StatusCode != 200 {
			t.Errorf("open connection %d: %v", i+1, err)
		}
	}
	cancel()
	waitRun(t, done)
}

// TestRunThrottleFlags logs in against run's server (bcrypt at DefaultCost)
// with the default limits and with both flags set.
func TestRunThrottleFlags(t *testing.T) {
	type login struct {
		email  string
		status int // 401 for a counted failure, 429 when throttled
	}
	tests := []struct {
		name   string
		args   []string
		logins []login
	}{
		{"default: 5 per account", nil, []login{
			{"a@x.io", 401}, {"a@x.io", 401}, {"a@x.io", 401}, {"a@x.io", 401}, {"a@x.io", 401}, {"a@x.io", 429},
		}},
		{"-max-failures-per-account 1 -max-failures-per-address 2", []string{"-max-failures-per-account", "1",
			"-max-failures-per-address", "2"}, []login{
			{"a@x.io", 401}, {"a@x.io", 429}, // the account's limit
			{"b@x.io", 401}, {"c@x.io", 429}, // the address's limit
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel() // each counted failure runs bcrypt at DefaultCost
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			args := append([]string{"-users", filepath.Join(t.TempDir(), "users.json")}, tt.args...)
			addr, _, done := startRun(t, ctx, args, map[string]string{"JWT_SECRET": testSecret})
			for i, l := range tt.logins {
				res, err := http.Post("http://"+addr+"/login", "application/json", strings.NewReader(creds(l.email, "guess")))
				if err != nil {
					t.Fatal(err)
				}
				res.Body.Close()
				if res.StatusCode != l.status {
					t.Errorf("login %d (%s) = %d, want %d", i+1, l.email, res.StatusCode, l.status)
				}
			}
			cancel()
			waitRun(t, done)
		})
	}
}

// TestRunHostCheck: run refuses other host names when it listens on
// loopback, takes them when it listens on every address, and takes an
// -allow-host name on loopback too.
func TestRunHostCheck(t *testing.T) {
	t.Parallel() // run makes its dummy hash at DefaultCost
	tests := []struct {
		addr     string
		allow    []string
		statuses map[string]int // by Host
	}{
		{"127.0.0.1:0", nil, map[string]int{"rebind.evil.test": 400, "localhost:8080": 200, "127.0.0.1": 200}},
		{"127.0.0.1:0", []string{"-allow-host", "myhost.test"}, map[string]int{"myhost.test": 200, "rebind.evil.test": 400}},
		{":0", nil, map[string]int{"rebind.evil.test": 200, "myhost.test": 200}},
	}
	for _, tt := range tests {
		ctx, cancel := context.WithCancel(context.Background())
		args := append([]string{"-addr", tt.addr, "-users", filepath.Join(t.TempDir(), "users.json")}, tt.allow...)
		addr, _, done := startRun(t, ctx, args, map[string]string{"JWT_SECRET": testSecret})
		_, port, _ := net.SplitHostPort(addr)
		for host, want := range tt.statuses {
			req, _ := http.NewRequest("GET", "http://127.0.0.1:"+port+"/healthz", nil)
			req.Host = host
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != want {
				t.Errorf("-addr %s %v, Host %s: status %d, want %d", tt.addr, tt.allow, host, res.StatusCode, want)
			}
		}
		cancel()
		waitRun(t, done)
	}
}

// TestRunHelp: -h prints the flags with their defaults and is no error.
// (A 100-failure default is read here rather than paid for in bcrypt runs.)
func TestRunHelp(t *testing.T) {
	var out syncBuffer
	if err := run(context.Background(), []string{"-h"}, envOf(nil), &out); err != nil {
		t.Errorf("run -h = %v, want nil", err)
	}
	for _, want := range []string{
		`-addr string`, `(default "localhost:8080")`,
		`-users string`, `(default "users.json")`,
		`-max-failures-per-account int`, `(default 5)`,
		`-max-failures-per-address int`, `(default 100)`,
		`-max-connections-per-address int`, `(default 64)`,
		`-max-failures-per-email int`, `(default 100)`,
		`-max-connections int`, fmt.Sprintf("(default %d)", defaultMaxConnections()),
		`-allow-origin value`, `-allow-host value`,
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("-h output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestRunStopsOnSIGTERM sends the test process SIGTERM while run holds the
// signal: run returns nil, so main exits 0. It must not run in parallel:
// every run going at the time would stop.
func TestRunStopsOnSIGTERM(t *testing.T) {
	_, _, done := startRun(t, context.Background(), []string{"-users", filepath.Join(t.TempDir(), "u.json")},
		map[string]string{"JWT_SECRET": testSecret})
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitRun(t, done)
}

// TestRunStopsWhileStarting cancels run while it is still loading the users
// file, here a named pipe that nobody writes, so loading never ends: run
// returns nil at once, as on SIGINT or SIGTERM.
func TestRunStopsWhileStarting(t *testing.T) {
	t.Parallel()
	pipe := filepath.Join(t.TempDir(), "users.json")
	if err := syscall.Mkfifo(pipe, 0o600); err != nil {
		t.Skipf("no named pipes here: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-users", pipe},
			envOf(map[string]string{"JWT_SECRET": testSecret}), io.Discard)
	}()
	time.Sleep(50 * time.Millisecond) // run is now blocked opening the pipe
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v, want nil", err)
		}
	case <-time.After(time.Second):
		t.Fatal("run did not return within a second of its context's end")
	}
	if w, err := os.OpenFile(pipe, os.O_WRONLY, 0); err == nil { // let the loading end
		w.Close()
	}
}

func TestRunWithoutSecretWarns(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, out, _ := startRun(t, ctx, []string{"-users", filepath.Join(t.TempDir(), "u.json")}, nil)
	if log := out.String(); !strings.Contains(log, "level=WARN") || !strings.Contains(log, "JWT_SECRET") ||
		!strings.Contains(log, "restart") {
		t.Errorf("log lacks the warning about JWT_SECRET:\n%s", log)
	}
}

func TestRunRefusesToStart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.json")
	const corruptContent = `{"next_id": 2, "users": [`
	os.WriteFile(corrupt, []byte(corruptContent), 0o600)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		words []string
	}{
		{"short secret", []string{"-users", filepath.Join(dir, "a.json")}, map[string]string{"JWT_SECRET": "0123456789"},
			[]string{"JWT_SECRET", "10 bytes", "32"}},
		{"empty secret", []string{"-users", filepath.Join(dir, "a.json")}, map[string]string{"JWT_SECRET": ""},
			[]string{"JWT_SECRET", "32"}},
		{"corrupt users file", []string{"-users", corrupt}, nil, []string{corrupt}},
		{"unknown flag", []string{"-port", "80"}, nil, []string{"port"}},
		{"users folder missing", []string{"-users", filepath.Join(dir, "nowhere", "users.json")}, nil,
			[]string{filepath.Join(dir, "nowhere", "users.json"), "folder"}},
		{"negative limit", []string{"-max-failures-per-account", "-1"}, nil, []string{"max-failures-per-account"}},
		{"negative connection limit", []string{"-max-connections-per-address", "-1"}, nil,
			[]string{"max-connections-per-address"}},
		{"address in use", []string{"-addr", busy.Addr().String(), "-users", filepath.Join(dir, "b.json")}, nil,
			[]string{"listen"}},
		{"any origin", []string{"-allow-origin", "*"}, nil, []string{"allow-origin", "*", "every page"}},
		{"an origin with a path", []string{"-allow-origin", "http://localhost:5173/"}, nil, []string{"allow-origin", "path"}},
		{"an origin without a scheme", []string{"-allow-origin", "localhost:5173"}, nil, []string{"allow-origin"}},
		{"a host with a port", []string{"-allow-host", "myhost.local:8080"}, nil, []string{"allow-host", "port"}},
		{"an origin in capitals", []string{"-allow-origin", "http://LocalHost:5173"}, nil, []string{"LocalHost",
			"as http://localhost:5173"}},
		{"a scheme in capitals", []string{"-allow-origin", "HTTP://localhost:5173"}, nil,
			[]string{"as http://localhost:5173"}},
		{"http's default port", []string{"-allow-origin", "http://localhost:80"}, nil, []string{"localhost:80",
			"as http://localhost:"}},
		{"https's default port", []string{"-allow-origin", "https://app.example:443"}, nil,
			[]string{"as https://app.example:"}},
		{"negative email limit", []string{"-max-failures-per-email", "-1"}, nil, []string{"max-failures-per-email"}},
		{"negative connections", []string{"-max-connections", "-1"}, nil, []string{"max-connections"}},
		{"connections above the limit on open files", []string{"-max-connections", fmt.Sprint(defaultMaxConnections() + 1)},
			nil,
			[]string{"max-connections", fmt.Sprint(defaultMaxConnections())}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out syncBuffer
			err := run(context.Background(), tt.args, envOf(tt.env), &out)
			if err == nil {
				t.Fatal("run = nil, want an error")
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is not one line", err)
			}
			for _, w := range tt.words {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	if got, _ := os.ReadFile(corrupt); string(got) != corruptContent {
		t.Errorf("corrupt users file changed to %q", got)
	}
}

// TestReadmeCommands keeps the README honest about the two commands.
func TestReadmeCommands(t *testing.T) {
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	found := map[string]bool{}
	for sc.Scan() {
		found[strings.TrimSpace(sc.Text())] = true
	}
	for _, cmd := range []string{"go run .", "go test ./..."} {
		if !found[cmd] {
			t.Errorf("README has no line %q", cmd)
		}
	}
}

// 7. Fuzz

// checkAccepted checks, by other means than verifyAccessToken's, that an
// accepted token obeys every rule a token must.
func checkAccepted(t *testing.T, token, sub string, key []byte, now time.Time) {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 || len(token) > 8<<10 {
		t.Fatalf("accepted %q: not three segments of at most 8 KiB", token)
	}
	var segs [3][]byte
	for i, p := range parts {
		b, err := base64.RawURLEncoding.Strict().DecodeString(p)
		if err != nil || base64.RawURLEncoding.EncodeToString(b) != p {
			t.Fatalf("accepted %q: segment %d is not canonical base64url", token, i)
		}
		segs[i] = b
	}
	if want := signRaw(parts[0]+"."+parts[1], key); token != want {
		t.Fatalf("accepted %q: signature is not the HMAC of its first two segments", token)
	}
	var header map[string]any
	if json.Unmarshal(segs[0], &header) != nil || header["alg"] != "HS256" || header["crit"] != nil {
		t.Fatalf("accepted %q: header %s", token, segs[0])
	}
	if typ, present := header["typ"]; present && typ != "JWT" {
		t.Fatalf("accepted %q: typ %v", token, typ)
	}
	var claims map[string]any
	if json.Unmarshal(segs[1], &claims) != nil {
		t.Fatalf("accepted %q: claims %s", token, segs[1])
	}
	exp, ok := claims["exp"].(float64)
	if !ok || exp <= float64(now.Unix()) {
		t.Fatalf("accepted %q: exp %v at %d", token, claims["exp"], now.Unix())
	}
	if nbf, present := claims["nbf"]; present {
		if n, ok := nbf.(float64); !ok || n > float64(now.Unix()) {
			t.Fatalf("accepted %q: nbf %v", token, nbf)
		}
	}
	if s, ok := claims["sub"].(string); !ok || s == "" || s != sub {
		t.Fatalf("accepted %q: sub %v, returned %q", token, claims["sub"], sub)
	}
}

// checkClientError checks an answer to an arbitrary request: never a 5xx,
// and every 4xx a JSON object with a detail sentence.
func checkClientError(t *testing.T, w *httptest.ResponseRecorder, contentType string, body []byte) {
	t.Helper()
	if w.Code >= 500 {
		t.Fatalf("Content-Type %q, body %q: status %d, body %s", contentType, body, w.Code, w.Body)
	}
	if w.Code < 400 {
		return
	}
	var answer map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &answer); err != nil || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("Content-Type %q, body %q: %d answer %q is not JSON", contentType, body, w.Code, w.Body)
	}
	if detail, ok := answer["detail"].(string); !ok || detail == "" {
		t.Fatalf("Content-Type %q, body %q: %d answer %s has no detail", contentType, body, w.Code, w.Body)
	}
}

// fuzzServer is a server for fuzzing with one user: throttling off, so that
// the fuzzer reaches bcrypt and the store rather than a 429.
func fuzzServer(f *testing.F) *testServer {
	ts := newTestServer(f, serverConfig{maxPerAccount: noLimit, maxPerAddress: noLimit})
	if w := ts.register(f, testEmail, testPassword); w.Code != http.StatusCreated {
		f.Fatalf("register: %d", w.Code)
	}
	return ts
}

// addFuzzSeeds adds request bodies and content types that reach each branch.
func addFuzzSeeds(f *testing.F) {
	for _, seed := range []struct{ contentType, body string }{
		{"application/json", creds("new@example.com", testPassword)},
		{"application/json", creds(testEmail, testPassword)},
		{"application/json; charset=utf-8", `{"email":" Ann@Example.com ","password":"correct horse battery","x":[1,{}]}`},
		{"application/json", `{"email":5,"password":null}`},
		{"application/json", `{"email":"a@b"`},
		{"application/json", `[] {}`},
		{"application/json", ``},
		{"application/problem+json", `{"email":"Ann <ann@example.com>","password":"` + strings.Repeat("p", 80) + `"}`},
		{"application/x-www-form-urlencoded",
			"grant_type=password&username=ann%40example.com&password=correct+horse+battery"},
		{"application/x-www-form-urlencoded", "grant_type=implicit&username=a&password=b"},
		{"application/x-www-form-urlencoded", "username=%zz"},
		{"text/plain", "hello"},
		{"", "{}"},
		{"application/json; charset=\"", "{}"},
		{"multipart/form-data; boundary=x", "--x\r\n\r\n--x--"},
	} {
		f.Add(seed.contentType, []byte(seed.body))
	}
}

// FuzzVerifyAccessToken feeds the verifier arbitrary tokens, and tokens
// signed with the key over arbitrary header and claims JSON. It must never
// panic, never accept a token whose signature is not the HMAC of its first
// two segments, and never accept one that breaks a rule.
func FuzzVerifyAccessToken(f *testing.F) {
	key := []byte(testSecret)
	now := time.Unix(testStart, 0)
	good := createAccessToken(testEmail, "a session", []byte(testSecret), now)
	f.Add(good, `{"alg":"HS256","typ":"JWT"}`, `{"sub":"ann@example.com","exp":1800001800}`)
	f.Add(good[:len(good)-1]+"A", `{"alg":"none"}`, `{"sub":"a","exp":1e999}`)
	f.Add("a.b.c", `{"alg":"HS256","crit":["b64"]}`, `{"sub":"","exp":1800000000}`)
	f.Add("", `{"alg":"HS256","typ":"jwt"}`, `{"sub":"a","exp":"1900000000","nbf":1900000000}`)
	f.Add(rfc7515Token,
		`{"ALG":"HS256"}`, `null`)
	f.Fuzz(func(t *testing.T, token, header, claims string) {
		for _, tok := range []string{token, forge(header, claims, key)} {
			sub, _, err := verifyAccessToken(tok, key, now)
			if err != nil {
				if !errors.Is(err, errInvalidToken) {
					t.Fatalf("verifyAccessToken(%q) = %v, not an errInvalidToken", tok, err)
				}
				continue
			}
			checkAccepted(t, tok, sub, key, now)
		}
	})
}

// FuzzRegister feeds POST /register arbitrary bodies and content types.
func FuzzRegister(f *testing.F) {
	ts := fuzzServer(f)
	addFuzzSeeds(f)
	f.Fuzz(func(t *testing.T, contentType string, body []byte) {
		w := ts.do(t, request{method: "POST", path: "/register", contentType: contentType, body: string(body)})
		checkClientError(t, w, contentType, body)
		if w.Code == http.StatusCreated {
			email, _ := decode(t, w.Body.Bytes())["email"].(string)
			if _, found := ts.users.lookup(email); !found || email != normalizeEmail(email) {
				t.Fatalf("201 %s, but the email is not stored as given", w.Body)
			}
		}
	})
}

// FuzzLogin feeds POST /login arbitrary bodies and content types.
func FuzzLogin(f *testing.F) {
	ts := fuzzServer(f)
	addFuzzSeeds(f)
	f.Fuzz(func(t *testing.T, contentType string, body []byte) {
		w := ts.do(t, request{method: "POST", path: "/login", contentType: contentType, body: string(body)})
		checkClientError(t, w, contentType, body)
		switch w.Code {
		case http.StatusOK:
			token, _ := decode(t, w.Body.Bytes())["access_token"].(string)
			if sub, _, err := verifyAccessToken(token, []byte(testSecret), ts.clock.now()); err != nil || sub != testEmail {
				t.Fatalf("200 for a token of %q, %v; only %s is registered", sub, err, testEmail)
			}
		case http.StatusUnauthorized:
			if w.Header().Get("WWW-Authenticate") != `Bearer realm="api"` {
				t.Fatalf("401 without its WWW-Authenticate")
			}
		}
	})
}

// 8. Benchmarks
//
// Each shows a property a user relies on. Run them all with
//
//	go test -run '^$' -bench . -benchmem ./...
//
// Large users files are built from one precomputed hash: the store does not
// care, and hashing 100,000 passwords would take minutes.

// benchHash is a bcrypt hash of testPassword at DefaultCost (10), made once
// for the benchmarks; BenchmarkLogin fails if it is not.
const benchHash = "$2a$10$7edQQjniQSKQWhFQtTMDyef2u300/yVEaL01dS.912AcmQeIm1OVy"

// writeUsersFile writes a users file of n users, user0@example.com and on,
// all with benchHash, and returns its path.
func writeUsersFile(b *testing.B, n int) string {
	b.Helper()
	f := storeFile{NextID: int64(n) + 1, Users: make([]User, n)}
	for i := range n {
		f.Users[i] = User{ID: int64(i) + 1, Email: fmt.Sprintf("user%d@example.com", i), PasswordHash: benchHash}
	}
	path := filepath.Join(b.TempDir(), "users.json")
	if err := os.WriteFile(path, storeFileBytes(f), 0o600); err != nil {
		b.Fatal(err)
	}
	return path
}

// benchServer is a server over n users at DefaultCost, throttling off. Its
// log lines are formatted, as when running, and then dropped.
func benchServer(b *testing.B, n int) *testServer {
	b.Helper()
	return newTestServer(b, serverConfig{
		usersPath:     writeUsersFile(b, n),
		cost:          bcrypt.DefaultCost,
		maxPerAccount: noLimit,
		maxPerAddress: noLimit,
		logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
}

// BenchmarkUsersMe times GET /users/me through the whole handler chain, at
// 10 and at 100,000 users: a lookup costs the same at both.
func BenchmarkUsersMe(b *testing.B) {
	for _, n := range []int{10, 100_000} {
		b.Run(fmt.Sprintf("users=%d", n), func(b *testing.B) {
			ts := benchServer(b, n)
			token := createAccessToken(fmt.Sprintf("user%d@example.com", n-1), "", []byte(testSecret), ts.clock.now())
			b.ReportAllocs()
			for b.Loop() {
				if w := ts.me(b, token); w.Code != 200 {
					b.Fatalf("status %d", w.Code)
				}
			}
		})
	}
}

// BenchmarkLogin times a successful JSON login through the handler chain,
// at bcrypt.DefaultCost: one login at a time, then with b.RunParallel. No
// lock is held while bcrypt runs, so logins run in parallel on every core.
func BenchmarkLogin(b *testing.B) {
	for _, n := range []int{10, 100_000} {
		ts := benchServer(b, n)
		email := fmt.Sprintf("user%d@example.com", n-1)
		login := func() {
			if w := ts.login(b, email, testPassword); w.Code != 200 {
				b.Fatalf("status %d", w.Code)
			}
		}
		b.Run(fmt.Sprintf("users=%d/serial", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				login()
			}
		})
		b.Run(fmt.Sprintf("users=%d/parallel", n), func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					login()
				}
			})
		})
	}
}

// BenchmarkCPUSlots times taking and giving back a bcrypt slot while one
// is free: what admission adds to a login when the server is not busy
// (compare BenchmarkLogin's 60 ms).
func BenchmarkCPUSlots(b *testing.B) {
	cpus := newCPUSlots()
	b.ReportAllocs()
	for b.Loop() {
		if err := cpus.acquire(context.Background()); err != nil {
			b.Fatal(err)
		}
		cpus.release()
	}
}

// BenchmarkRegisterWrite times a registration's store write as users grow,
// bcrypt excluded: the whole file encoded, written atomically and synced,
// then the swap.
func BenchmarkRegisterWrite(b *testing.B) {
	for _, n := range []int{1_000, 10_000, 100_000} {
		b.Run(fmt.Sprintf("users=%d", n), func(b *testing.B) {
			users, err := openStore(writeUsersFile(b, n), discardLog)
			if err != nil {
				b.Fatal(err)
			}
			i := 0
			b.ReportAllocs()
			for b.Loop() {
				i++
				if _, err := users.add(context.Background(), fmt.Sprintf("new%d@example.com", i), benchHash); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUsersMeDuringRegistrations times GET /users/me at 100,000 users
// while registrations write the users file without pause. A lookup must not
// queue behind a write: worst-ns, the slowest request, stays below a
// write's time (see BenchmarkRegisterWrite).
func BenchmarkUsersMeDuringRegistrations(b *testing.B) {
	ts := benchServer(b, 100_000)
	token := createAccessToken("user0@example.com", "", []byte(testSecret), ts.clock.now())

	stop := make(chan struct{})
	var writes sync.WaitGroup
	writes.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := ts.users.add(context.Background(), fmt.Sprintf("writer%d@example.com", i), benchHash); err != nil {
				panic(err)
			}
		}
	})
	time.Sleep(10 * time.Millisecond) // let the first write begin
	var worst time.Duration
	b.ReportAllocs()
	for b.Loop() {
		start := time.Now()
		w := ts.me(b, token)
		worst = max(worst, time.Since(start))
		if w.Code != 200 {
			b.Fatalf("status %d", w.Code)
		}
	}
	close(stop)
	writes.Wait()
	b.ReportMetric(float64(worst.Nanoseconds()), "worst-ns")
}

// hostileBody is a login of 64 KiB whose unknown member holds nothing but
// small objects: each costs a JSON reader that builds maps an allocation
// many times its size.
func hostileBody() string {
	return `{"email":"ann@example.com","password":"x","pad":[` + strings.Repeat(`{"":0},`, 9350) + `{"":0}]}`
}

// BenchmarkHostileBody times a login whose body is hostileBody through the
// whole handler chain, and reports the bytes allocated for each byte of
// the body: reading costs a small multiple of what the body costs.
func BenchmarkHostileBody(b *testing.B) {
	ts := newTestServer(b, serverConfig{maxPerAccount: noLimit, maxPerAddress: noLimit, maxPerEmail: noLimit})
	body := hostileBody()
	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	before := stats.TotalAlloc
	b.ReportAllocs()
	for b.Loop() {
		if w := ts.do(b, postJSON("/login", body)); w.Code != 401 {
			b.Fatalf("status %d", w.Code)
		}
	}
	runtime.ReadMemStats(&stats)
	b.ReportMetric(float64(stats.TotalAlloc-before)/float64(b.N)/float64(len(body)), "alloc/body-byte")
}

// BenchmarkCreateAccessToken times making a token: JSON, base64 and one
// HMAC-SHA256.
func BenchmarkCreateAccessToken(b *testing.B) {
	now := time.Unix(testStart, 0)
	b.ReportAllocs()
	for b.Loop() {
		createAccessToken(testEmail, "XK5QMOW2JHNMTDKBZAXXDQ6BNE", []byte(testSecret), now)
	}
}

// BenchmarkVerifyAccessToken times every check of a valid token.
func BenchmarkVerifyAccessToken(b *testing.B) {
	now := time.Unix(testStart, 0)
	token := createAccessToken(testEmail, "XK5QMOW2JHNMTDKBZAXXDQ6BNE", []byte(testSecret), now)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := verifyAccessToken(token, []byte(testSecret), now); err != nil {
			b.Fatal(err)
		}
	}
}
