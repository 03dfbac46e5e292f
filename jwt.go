// jwt.go holds the access token: an HS256 JSON Web Token (RFC 7519) that
// signs the user's email for 30 minutes. It is built from crypto/hmac,
// crypto/sha256 and encoding/base64 rather than a library, so that every
// check a verifier must make is in plain sight. It knows nothing of users:
// the caller decides whether the token's subject still exists.
//
// A token is three base64url segments joined by dots: a header saying how
// it is signed, the claims, and the HMAC-SHA256 of the first two segments.
// Its header and claims are read by decodeObject, the one strict JSON
// reader, which request bodies share.

package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

const (
	accessTokenLifetime = 30 * time.Minute
	maxTokenBytes       = 8 << 10
	minSecretBytes      = 32 // HMAC-SHA256 wants a key at least as long as its output

	// jwtHeader is the header of every token this server issues.
	jwtHeader = `{"alg":"HS256","typ":"JWT"}`
)

// errInvalidToken is wrapped by every reason a token is refused.
var errInvalidToken = errors.New("invalid token")

// b64 is base64url without padding, strict: trailing bits must be zero, so
// that each token has exactly one spelling.
var b64 = base64.RawURLEncoding.Strict()

// createAccessToken returns a token for email, issued at now and expiring
// 30 minutes later, signed with secret.
func createAccessToken(email string, secret []byte, now time.Time) string {
	// A struct of a string and two numbers always encodes: no error to check.
	claims, _ := json.Marshal(struct {
		Sub string `json:"sub"`
		Iat int64  `json:"iat"`
		Exp int64  `json:"exp"`
	}{email, now.Unix(), now.Add(accessTokenLifetime).Unix()})
	signingInput := b64.EncodeToString([]byte(jwtHeader)) + "." + b64.EncodeToString(claims)
	return signingInput + "." + b64.EncodeToString(sign(signingInput, secret))
}

// verifyAccessToken checks token at time now and returns its subject, the
// email it was issued for. It makes the checks of RFC 7519 section 7.2 and
// RFC 8725; every refusal wraps errInvalidToken.
func verifyAccessToken(token string, secret []byte, now time.Time) (string, error) {
	if len(token) > maxTokenBytes {
		return "", fmt.Errorf("%w: longer than %d bytes", errInvalidToken, maxTokenBytes)
	}
	// The base64 decoder skips CR and LF, so they are refused here; every
	// other byte that is not base64url fails the strict decoding below.
	segs := strings.Split(token, ".")
	if len(segs) != 3 || strings.ContainsAny(token, "\r\n") {
		return "", fmt.Errorf("%w: not three base64url segments", errInvalidToken)
	}

	header, err := decodeSegment(segs[0])
	if err != nil {
		return "", fmt.Errorf("%w: header: %w", errInvalidToken, err)
	}
	// Only HS256: a token must not choose its own check ("none", or an
	// algorithm whose key could be confused with ours).
	if alg, _ := header["alg"].(string); alg != "HS256" {
		return "", fmt.Errorf("%w: alg is not HS256", errInvalidToken)
	}
	if typ, present := header["typ"]; present && typ != "JWT" {
		return "", fmt.Errorf("%w: typ is not JWT", errInvalidToken)
	}
	// crit lists extensions the token says we must understand; we know none.
	if _, present := header["crit"]; present {
		return "", fmt.Errorf("%w: crit present", errInvalidToken)
	}

	// Over the segments as received, compared in constant time so that the
	// time taken does not tell a forger how much of a signature is right.
	sig, err := b64.DecodeString(segs[2])
	if err != nil || !hmac.Equal(sig, sign(segs[0]+"."+segs[1], secret)) {
		return "", fmt.Errorf("%w: bad signature", errInvalidToken)
	}

	claims, err := decodeSegment(segs[1])
	if err != nil {
		return "", fmt.Errorf("%w: claims: %w", errInvalidToken, err)
	}
	nowSeconds := float64(now.UnixNano()) / 1e9 // exp and nbf may have fractions
	exp, ok := claims["exp"].(float64)
	if !ok {
		return "", fmt.Errorf("%w: exp missing or not a number", errInvalidToken)
	}
	if nowSeconds >= exp {
		return "", fmt.Errorf("%w: expired", errInvalidToken)
	}
	if nbf, present := claims["nbf"]; present {
		if nbf, ok := nbf.(float64); !ok || nbf > nowSeconds {
			return "", fmt.Errorf("%w: nbf not a number or in the future", errInvalidToken)
		}
	}
	sub, _ := claims["sub"].(string)
	if sub == "" {
		return "", fmt.Errorf("%w: sub missing or not a non-empty string", errInvalidToken)
	}
	return sub, nil
}

// sign returns the HMAC-SHA256 of a token's signing input under secret.
func sign(signingInput string, secret []byte) []byte {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(signingInput))
	return mac.Sum(nil)
}

// decodeSegment decodes a base64url segment that holds a JSON object.
func decodeSegment(seg string) (map[string]any, error) {
	data, err := b64.DecodeString(seg)
	if err != nil {
		return nil, fmt.Errorf("base64url: %w", err)
	}
	return decodeObject(data)
}

// decodeObject decodes data, one JSON object and nothing after it, into a
// map of its members: for bodies and tokens alike, more strictly than
// json.Unmarshal alone, so that no two readers of one text can disagree
// about it. A member counts only under its exact name (a struct field
// would match "EMAIL", or "paſſword" with a long s), a name twice is
// refused, not last-wins, and text that is not UTF-8 is refused, not mended.
func decodeObject(data []byte) (map[string]any, error) {
	if !utf8.Valid(data) {
		return nil, errors.New("must be valid UTF-8")
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New("must not be empty")
	}
	var object map[string]any
	if err := json.Unmarshal(data, &object); err != nil || object == nil {
		if syntaxErr := (*json.SyntaxError)(nil); errors.As(err, &syntaxErr) {
			return nil, fmt.Errorf("is not one JSON object: it is malformed at byte %d", syntaxErr.Offset)
		}
		if typeErr := (*json.UnmarshalTypeError)(nil); errors.As(err, &typeErr) && object != nil {
			return nil, fmt.Errorf("holds a %s, out of range", typeErr.Value)
		}
		return nil, errors.New("must be a JSON object") // another type of value, or null
	}
	if len(object) > 0 && countMembers(data) != len(object) { // the map kept one of two
		return nil, fmt.Errorf("names %q twice", twiceNamed(data))
	}
	return object, nil
}

// twiceNamed returns the first name that a valid object gives two members.
func twiceNamed(object []byte) string {
	dec := json.NewDecoder(bytes.NewReader(object))
	dec.Token() // the opening brace
	seen := map[string]bool{}
	for dec.More() {
		token, _ := dec.Token()
		name, _ := token.(string)
		if seen[name] {
			return name
		}
		seen[name] = true
		var value json.RawMessage
		dec.Decode(&value)
	}
	return ""
}

// countMembers counts the members of an object that json.Unmarshal has
// found valid: the commas outside strings and inside the outermost braces
// only, plus one.
func countMembers(object []byte) int {
	n, depth, inString, escaped := 1, 0, false, false
	for _, c := range object {
		switch {
		case escaped:
			escaped = false
		case inString:
			escaped = c == '\\'
			inString = c != '"'
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			depth--
		case c == ',' && depth == 1:
			n++
		}
	}
	return n
}
