// auth.go holds passwords and logins. First the chapter's own functions:
// hashPassword, verifyPassword, and authenticateUser, which looks the user
// up and checks the password; then the rules a new password and email must
// follow. Then the defenses' machinery, which main.go's wrappers put around
// the routes: cpuSlots, which keeps bcrypt from overloading the CPUs;
// compareAgain, which makes every failed login cost the costliest
// comparison; and loginLimiter, which stops password guessing.

package main

import (
	"container/list"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/mail"
	"runtime"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"
)

// errInvalidCredentials is every failed login: unknown email and wrong
// password alike, so that no answer tells which emails are registered.
var errInvalidCredentials = errors.New("invalid email or password")

// hashPassword returns the bcrypt hash of password at the given cost.
func hashPassword(password string, cost int) (string, error) {
	hash, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		return "", fmt.Errorf("hash password: %w", err)
	}
	return string(hash), nil
}

// verifyPassword reports whether password matches the bcrypt hash, in time
// that does not depend on where they differ.
func verifyPassword(password, hash string) bool {
	err := bcrypt.CompareHashAndPassword([]byte(hash), []byte(password))
	// bcrypt reads only 72 bytes, so a longer password would match the hash
	// of its first 72: refused, after the same comparison as any other.
	return err == nil && len(password) <= maxPasswordBytes
}

// authenticateUser returns the user of users whose email and password
// these are, or errInvalidCredentials: the chapter's lookup by email and
// its one condition for both failures. Any password is simply compared
// with the stored hash: no registration rule applies.
func authenticateUser(users *store, dummyHash, email, password string) (User, error) {
	u, found := users.lookup(normalizeEmail(email))
	if !found {
		// The same bcrypt run as a wrong password, so that the time taken
		// does not tell that the email is unknown.
		verifyPassword(password, dummyHash)
		return User{}, errInvalidCredentials
	}
	if !verifyPassword(password, u.PasswordHash) {
		return User{}, errInvalidCredentials
	}
	return u, nil
}

// The rules for what a user registers with.
const (
	maxEmailBytes    = 254 // the longest address SMTP can carry (RFC 5321, erratum 1690)
	minPasswordChars = 15  // for a password that is the only factor (NIST SP 800-63B-4, 3.1.1.2)
	maxPasswordBytes = 72  // bcrypt reads no further; a longer password is refused, never cut
)

// validationError says which rule a registration broke, for the client.
type validationError string

func (e validationError) Error() string { return string(e) }

// validateEmail checks a normalised email: printable ASCII, at most 254
// bytes, and a bare address that net/mail accepts (no display name, no
// angle brackets).
func validateEmail(email string) error {
	if len(email) > maxEmailBytes {
		return validationError(fmt.Sprintf("email must be at most %d bytes", maxEmailBytes))
	}
	// ASCII leaves no two spellings of one address that look alike: no
	// invisible characters, no Unicode case or normalisation forms, no
	// letters from other scripts that look like Latin ones.
	if i := strings.IndexFunc(email, func(r rune) bool { return r < '!' || r > '~' }); i >= 0 {
		return validationError(fmt.Sprintf("email must be printable ASCII, with an internationalised domain in its xn-- form; it holds %U at byte %d", []rune(email[i:])[0], i))
	}
	addr, err := mail.ParseAddress(email)
	if err != nil || addr.Name != "" || addr.Address != email {
		return validationError("email must be a plain address such as ann@example.com")
	}
	return nil
}

// validatePassword checks a new password for an email, as NIST SP
// 800-63B-4 asks: at least 15 characters, each code point counting as one,
// no rules on kinds of characters; not the email, nor holding its local
// part (before the @) if that has 4 characters or more. And at most 72
// bytes, all that bcrypt reads.
func validatePassword(password, email string) error {
	local := email[:max(0, strings.LastIndexByte(email, '@'))] // "" for an email without @

	switch {
	case utf8.RuneCountInString(password) < minPasswordChars:
		return validationError(fmt.Sprintf("password must be at least %d characters", minPasswordChars))
	case len(password) > maxPasswordBytes:
		return validationError(fmt.Sprintf("password must be at most %d bytes (the limit of bcrypt)", maxPasswordBytes))
	case strings.EqualFold(password, email):
		return validationError("password must not be the email")
	case len(local) >= 4 && strings.Contains(strings.ToLower(password), local):
		return validationError(fmt.Sprintf("password must not contain %q, the email's part before the @", local))
	}
	return nil
}

// The defenses begin here.

// hashCost returns the cost of a bcrypt hash, 0 for one it cannot parse.
func hashCost(hash string) int {
	cost, _ := bcrypt.Cost([]byte(hash))
	return cost
}

// compareAgain compares password with hash, whose comparison has just
// failed, as many more times as make the work of one comparison at cost
// costliest: bcrypt's work doubles with each step of cost, so a hash two
// steps cheaper is compared three more times. So a failed login costs the
// same time, and the same time in its CPU slot, whatever the cost of the
// hash it was checked against, and tells nobody whether its email exists.
func compareAgain(password, hash string, costliest int) {
	for range 1<<max(0, costliest-hashCost(hash)) - 1 {
		verifyPassword(password, hash)
	}
}

// errServerBusy refuses a request that found no CPU free to run bcrypt in
// time, or whose client gave up waiting.
var errServerBusy = errors.New("server busy: no CPU free for bcrypt")

// maxBcryptWait is how long a request waits for a CPU before it is refused.
const maxBcryptWait = 2 * time.Second

// cpuSlots lets as many bcrypt runs at once as there are CPUs: a run keeps
// a CPU busy throughout, so more at once would slow all down together until
// all time out. The others wait their turn, first come first served (a
// channel's free slot goes to the sender that has waited longest), and are
// refused after maxWait: the CPUs keep doing as many logins as they can.
type cpuSlots struct {
	slots   chan struct{} // one value for each bcrypt run under way
	maxWait time.Duration
}

// newCPUSlots returns one slot for each CPU the Go scheduler uses
// (GOMAXPROCS), and a wait of maxBcryptWait.
func newCPUSlots() *cpuSlots {
	return &cpuSlots{slots: make(chan struct{}, runtime.GOMAXPROCS(0)), maxWait: maxBcryptWait}
}

// acquire takes a slot, waiting for at most maxWait; if none comes free in
// time, or ctx ends first, it returns errServerBusy. Each acquire that
// succeeds must be followed by a release.
func (c *cpuSlots) acquire(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.maxWait)
	defer cancel()
	select {
	case c.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return errServerBusy
	}
}

func (c *cpuSlots) release() { <-c.slots }

// Throttling of failed logins.
const (
	failureWindow     = 15 * time.Minute
	maxLimiterEntries = 100_000 // bounds the counters' memory
)

// loginLimiter stops password guessing (RFC 6749 section 4.3.2): it counts
// failed logins for each client address and email, and for each address,
// over a 15-minute window opened by the first; at the limit, every attempt
// under it is refused until the window closes.
//
// An attempt is counted as a failure when it begins, before bcrypt runs,
// and taken back if it succeeds. So concurrent guesses cannot slip past the
// limit while bcrypt runs.
type loginLimiter struct {
	maxPerAccount int // failures for one address and email; 0: no limit
	maxPerAddress int // failures for one address; 0: no limit
	now           func() time.Time

	// mu guards the fields below. It is never held while bcrypt runs.
	mu     sync.Mutex
	counts map[limiterKey]*list.Element // each holds a *failureCount
	// byAge holds the counts oldest first. Every window is 15 minutes long,
	// so the oldest count is also the first to expire.
	byAge list.List
}

// limiterKey names a count. A login's email may be any string up to the
// 64 KiB body limit, so the key holds its SHA-256, which bounds a count's
// size; an address's own count has none.
type limiterKey struct {
	addr  string
	email [sha256.Size]byte // zero for the address's own count
}

// limiterKeys returns the keys of the two counts a login by addr for email
// falls under.
func limiterKeys(addr, email string) (account, address limiterKey) {
	return limiterKey{addr, sha256.Sum256([]byte(email))}, limiterKey{addr: addr}
}

// failureCount is one count's state.
type failureCount struct {
	key     limiterKey
	n       int
	expires time.Time // when the window, opened by the first failure, closes
}

// newLoginLimiter returns a limiter with the given limits (0 turns one off)
// and clock.
func newLoginLimiter(maxPerAccount, maxPerAddress int, now func() time.Time) *loginLimiter {
	return &loginLimiter{
		maxPerAccount: maxPerAccount,
		maxPerAddress: maxPerAddress,
		now:           now,
		counts:        make(map[limiterKey]*list.Element),
	}
}

// begin counts a login attempt by addr for email as a failure, and returns
// 0. If a limit is already reached, it counts nothing and returns how long
// the attempt must wait, in whole seconds rounded up, as Retry-After says.
func (l *loginLimiter) begin(addr, email string) (retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.dropExpired(now)

	account, address := limiterKeys(addr, email)
	wait := max(l.wait(account, l.maxPerAccount, now), l.wait(address, l.maxPerAddress, now))
	if wait > 0 {
		return (wait + time.Second - 1).Truncate(time.Second)
	}
	l.count(account, l.maxPerAccount, now)
	l.count(address, l.maxPerAddress, now)
	return 0
}

// succeeded clears the count of addr and email after a login succeeded, and
// takes its own attempt back from the address's count: failures made
// against other emails stay counted, or one account of one's own would
// reset the address's limit.
func (l *loginLimiter) succeeded(addr, email string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	account, address := limiterKeys(addr, email)
	if e, ok := l.counts[account]; ok {
		l.remove(e)
	}
	l.uncount(address)
}

// cancel takes back an attempt that begin counted but whose password was
// never checked.
func (l *loginLimiter) cancel(addr, email string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	account, address := limiterKeys(addr, email)
	l.uncount(account)
	l.uncount(address)
}

// wait returns how long the count under key, whose limit is max, still
// refuses logins: zero if it does not. A limit of 0 keeps no count.
func (l *loginLimiter) wait(key limiterKey, max int, now time.Time) time.Duration {
	e, ok := l.counts[key]
	if !ok || e.Value.(*failureCount).n < max {
		return 0
	}
	return e.Value.(*failureCount).expires.Sub(now)
}

// count counts one failure under key, opening a window if there is none.
// When the counts are full, the oldest goes to make room.
func (l *loginLimiter) count(key limiterKey, max int, now time.Time) {
	if max == 0 {
		return
	}
	if e, ok := l.counts[key]; ok {
		e.Value.(*failureCount).n++
		return
	}
	if len(l.counts) >= maxLimiterEntries {
		l.remove(l.byAge.Front())
	}
	l.counts[key] = l.byAge.PushBack(&failureCount{key: key, n: 1, expires: now.Add(failureWindow)})
}

// uncount takes one failure back from the count under key.
func (l *loginLimiter) uncount(key limiterKey) {
	e, ok := l.counts[key]
	if !ok {
		return
	}
	if c := e.Value.(*failureCount); c.n > 1 {
		c.n--
		return
	}
	l.remove(e)
}

// dropExpired removes the counts whose window has closed: they are at the
// front of byAge.
func (l *loginLimiter) dropExpired(now time.Time) {
	for e := l.byAge.Front(); e != nil && !now.Before(e.Value.(*failureCount).expires); e = l.byAge.Front() {
		l.remove(e)
	}
}

func (l *loginLimiter) remove(e *list.Element) {
	delete(l.counts, e.Value.(*failureCount).key)
	l.byAge.Remove(e)
}
