// auth.go holds passwords and logins. First the chapter's own functions:
// hashPassword, verifyPassword, and authenticateUser, which looks the user
// up and checks the password; then the rules a new password and email must
// follow. Then the defenses' machinery, which main.go's wrappers put around
// the routes: slots, which keep bcrypt from overloading the CPUs;
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
// costliest (comparisons says how many in all). So a failed login costs
// the same time, and the same time in its CPU slot, whatever the cost of
// the hash it was checked against, and tells nobody whether its email
// exists.
func compareAgain(password, hash string, costliest int) {
	for range comparisons(hashCost(hash), costliest) - 1 {
		verifyPassword(password, hash)
	}
}

// comparisons returns how many comparisons at cost make the work of one at
// costliest. A comparison at cost c is 2^c rounds of bcrypt's key schedule
// and about one round more to begin, so (2^costliest + 1) / (2^c + 1),
// rounded: 4 at two steps cheaper, 241 at cost 4 for 12 (256 would take 6%
// longer).
func comparisons(cost, costliest int) int {
	return (1<<costliest + 1 + (1<<cost+1)/2) / (1<<cost + 1)
}

// errServerBusy refuses a request that found no slot free in time, or
// whose client gave up waiting.
var errServerBusy = errors.New("server busy: no slot free in time")

// maxSlotWait is how long a request waits for a slot before it is refused.
const maxSlotWait = 2 * time.Second

// slots lets so many requests run at once, as many as it has slots; the
// others wait their turn, first come first served (a channel's free slot
// goes to the sender that has waited longest), and are refused after
// maxWait, so that each hears how it ended in time.
type slots struct {
	held    chan struct{} // one value for each request running
	maxWait time.Duration
}

// newCPUSlots returns one slot for each CPU the Go scheduler uses
// (GOMAXPROCS), for bcrypt runs: a run keeps a CPU busy throughout, so more
// at once would slow all down together until all time out.
func newCPUSlots() *slots {
	return &slots{held: make(chan struct{}, runtime.GOMAXPROCS(0)), maxWait: maxSlotWait}
}

// newChangeSlots returns one slot, for changes to the users file: they take
// turns at the file anyway.
func newChangeSlots() *slots {
	return &slots{held: make(chan struct{}, 1), maxWait: maxSlotWait}
}

// acquire takes a slot, waiting for at most maxWait; if none comes free in
// time, or ctx ends first, it returns errServerBusy. Each acquire that
// succeeds must be followed by a release.
func (s *slots) acquire(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.maxWait)
	defer cancel()
	select {
	case s.held <- struct{}{}:
		return nil
	case <-ctx.Done():
		return errServerBusy
	}
}

func (s *slots) release() { <-s.held }

// Throttling of failed logins.
const (
	failureWindow     = 15 * time.Minute
	maxLimiterEntries = 100_000 // bounds each of the limiter's tables
)

// loginLimiter stops password guessing (RFC 6749 section 4.3.2): it counts
// failed logins for each client address and email, for each address, and
// for each email from all addresses, over a 15-minute window opened by the
// first; at a limit, every attempt under it is refused until the window
// closes. Past the limit for an email, which many addresses reach
// together, an address that logged in as that email within the window
// still may try it: so a guesser with many addresses cannot lock the owner
// out (NIST SP 800-63B-4 section 3.2.2).
//
// An attempt is counted as a failure when it begins, before bcrypt runs,
// and taken back if it succeeds. So concurrent guesses cannot slip past the
// limit while bcrypt runs.
type loginLimiter struct {
	maxPerAccount int // failures for one address and email; 0: no limit
	maxPerAddress int // failures for one address; 0: no limit
	maxPerEmail   int // failures for one email from all addresses; 0: no limit
	now           func() time.Time

	// mu guards the tables. It is never held while bcrypt runs.
	mu       sync.Mutex
	failures window // the counts of failures
	trusted  window // each address and email that logged in within the window
}

// limiterKey names an entry of the limiter's tables. A login's email may
// be any string up to the 64 KiB body limit, so the key holds its SHA-256,
// which bounds an entry's size.
type limiterKey struct {
	addr  string            // "" for an email's count from all addresses
	email [sha256.Size]byte // zero for an address's own count
}

// limiterKeys returns the keys of the three counts a login by addr for
// email falls under: the address and email, the address, and the email.
func limiterKeys(addr, email string) (account, address, everywhere limiterKey) {
	sum := sha256.Sum256([]byte(email))
	return limiterKey{addr, sum}, limiterKey{addr: addr}, limiterKey{email: sum}
}

// newLoginLimiter returns a limiter with the given limits (0 turns one off)
// and clock.
func newLoginLimiter(maxPerAccount, maxPerAddress, maxPerEmail int, now func() time.Time) *loginLimiter {
	return &loginLimiter{
		maxPerAccount: maxPerAccount,
		maxPerAddress: maxPerAddress,
		maxPerEmail:   maxPerEmail,
		now:           now,
		failures:      window{entries: make(map[limiterKey]*list.Element)},
		trusted:       window{entries: make(map[limiterKey]*list.Element)},
	}
}

// begin counts a login attempt by addr for email as a failure, and returns
// 0. If a limit is already reached, it counts nothing and returns how long
// the attempt must wait, in whole seconds rounded up, as Retry-After says.
func (l *loginLimiter) begin(addr, email string) (retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.failures.dropExpired(now)
	l.trusted.dropExpired(now)

	account, address, everywhere := limiterKeys(addr, email)
	wait := max(l.wait(account, l.maxPerAccount, now), l.wait(address, l.maxPerAddress, now))
	if l.trusted.get(account) == nil {
		wait = max(wait, l.wait(everywhere, l.maxPerEmail, now))
	}
	if wait > 0 {
		return (wait + time.Second - 1).Truncate(time.Second)
	}
	l.count(account, l.maxPerAccount, now)
	l.count(address, l.maxPerAddress, now)
	l.count(everywhere, l.maxPerEmail, now)
	return 0
}

// succeeded clears the count of addr and email after a login succeeded,
// takes its own attempt back from the address's and the email's counts,
// and trusts addr for email for a window. Failures made against other
// emails stay counted, or one account of one's own would reset the
// address's limit; and failures made from other addresses stay counted,
// or the owner's logins would give a guesser a new 100 guesses each.
func (l *loginLimiter) succeeded(addr, email string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	account, address, everywhere := limiterKeys(addr, email)
	l.failures.remove(account)
	l.uncount(address)
	l.uncount(everywhere)
	if l.maxPerEmail > 0 {
		l.trusted.remove(account) // to renew its window
		l.trusted.add(account, l.now())
	}
}

// cancel takes back an attempt that begin counted but whose password was
// never checked.
func (l *loginLimiter) cancel(addr, email string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	account, address, everywhere := limiterKeys(addr, email)
	l.uncount(account)
	l.uncount(address)
	l.uncount(everywhere)
}

// wait returns how long the count under key, whose limit is max, still
// refuses logins: zero if it does not. A limit of 0 keeps no count.
func (l *loginLimiter) wait(key limiterKey, max int, now time.Time) time.Duration {
	c := l.failures.get(key)
	if c == nil || c.n < max {
		return 0
	}
	return c.expires.Sub(now)
}

// count counts one failure under key, opening a window if there is none.
func (l *loginLimiter) count(key limiterKey, max int, now time.Time) {
	if max == 0 {
		return
	}
	c := l.failures.get(key)
	if c == nil {
		c = l.failures.add(key, now)
	}
	c.n++
}

// uncount takes one failure back from the count under key.
func (l *loginLimiter) uncount(key limiterKey) {
	c := l.failures.get(key)
	switch {
	case c == nil:
	case c.n > 1:
		c.n--
	default:
		l.failures.remove(key)
	}
}

// window is a table of entries that each last failureWindow from when they
// were made, maxLimiterEntries at most: when it is full, the oldest goes
// to make room. Every entry lasts as long, so the oldest is also the first
// to expire.
type window struct {
	entries map[limiterKey]*list.Element // each holds a *windowEntry
	byAge   list.List                    // the entries, oldest first
}

// windowEntry is an entry of a window: a count of failures, or an address
// trusted for an email.
type windowEntry struct {
	key     limiterKey
	n       int       // failures counted
	expires time.Time // when the window, opened by the entry, closes
}

// get returns the entry under key, or nil.
func (w *window) get(key limiterKey) *windowEntry {
	if e, ok := w.entries[key]; ok {
		return e.Value.(*windowEntry)
	}
	return nil
}

// add makes an entry under key, lasting from now, and returns it.
func (w *window) add(key limiterKey, now time.Time) *windowEntry {
	if len(w.entries) >= maxLimiterEntries {
		w.remove(w.byAge.Front().Value.(*windowEntry).key)
	}
	entry := &windowEntry{key: key, expires: now.Add(failureWindow)}
	w.entries[key] = w.byAge.PushBack(entry)
	return entry
}

// remove removes the entry under key, if there is one.
func (w *window) remove(key limiterKey) {
	if e, ok := w.entries[key]; ok {
		delete(w.entries, key)
		w.byAge.Remove(e)
	}
}

// dropExpired removes the entries whose window has closed: they are at the
// front of byAge.
func (w *window) dropExpired(now time.Time) {
	for e := w.byAge.Front(); e != nil && !now.Before(e.Value.(*windowEntry).expires); e = w.byAge.Front() {
		w.remove(e.Value.(*windowEntry).key)
	}
}
